"""The desired-state git source: a bare mirror of one branch and immutable per-commit snapshots.

The daemon's reconcile pass calls :meth:`GitSource.fetch` to learn the branch head, then
:meth:`GitSource.snapshot` to get a directory holding exactly that commit's tree (signature
checked first when required), and :meth:`GitSource.prune` to drop snapshots it no longer needs.

This is the only module besides the tests that runs git. It drives the ``git`` CLI directly
(not GitPython) so every call has a hard timeout that kills the whole process group (ssh and
``git-remote-https`` helpers included), runs non-interactively, and has its stderr at hand for
messages. Every failure surfaces as :class:`SourceError` (or :class:`UnsignedCommit`); no
``subprocess``/``OSError``/``tarfile`` exception escapes, and credentials embedded in a URL
(``https://user:pass@host/...``) never appear in a message.

Layout under ``cache_dir``::

    mirror.git/            bare mirror; only refs/heads/<branch> is fetched (forced, pruned)
    snapshots/<sha>/       exported tree of one commit (created atomically, never modified)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.core.errors import AgentError

_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_HEX_PREFIX = re.compile(r"[0-9a-fA-F]{4,64}")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SCP_LIKE = re.compile(r"^[^/\s:@]+@[^/\s:]+:")
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# Highest-precedence attributes: `git archive` must not drop (export-ignore), rewrite
# (export-subst, ident, filters) or convert line endings of committed files.
_RAW_ATTRIBUTES = "* -text -eol -filter -ident -export-ignore -export-subst -working-tree-encoding\n"
_GIT_BOILERPLATE = ("Please make sure you have the correct access rights", "and the repository exists")
_SSH_COMMAND = "ssh -o BatchMode=yes -o ConnectTimeout=10"


class SourceError(AgentError):
    """The desired-state repository cannot be fetched or exported; the message says which and why."""


class UnsignedCommit(SourceError):
    """Signed commits are required and this one is unsigned, badly signed or by a key not allowed."""


@dataclass(frozen=True)
class Snapshot:
    """One commit's tree on disk; ``path`` is the desired-state root (snapshot dir + ``subdir``)."""

    commit: str
    path: Path
    subject: str
    author: str


def redact(text: str) -> str:
    """Hide the ``user:password@`` part of any URL in ``text``."""
    return _USERINFO.sub("***@", text)


class GitSource:
    """One branch of one repository, mirrored under ``cache_dir``."""

    def __init__(  # noqa: PLR0913 - keyword-only settings of one source, each documented
        self,
        url: str,
        branch: str,
        cache_dir: Path,
        *,
        subdir: str = "",
        require_signed: bool = False,
        allowed_signers: Path | None = None,
        gpg_home: Path | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if not url:
            raise SourceError("repository url is empty")
        if not branch or branch.startswith("-") or any(c in branch for c in " ~^:?*[\\") or ".." in branch:
            raise SourceError(f"invalid branch name {branch!r} for {redact(url)}")
        sub = PurePosixPath(subdir.strip("/") or ".")
        if sub.is_absolute() or ".." in sub.parts:
            raise SourceError(f"subdir {subdir!r} must be a relative path inside the repository")
        if require_signed and allowed_signers is None and gpg_home is None:
            raise SourceError("require_signed_commits needs allowed_signers or gpg_home")
        # A plain path is resolved now: git runs with the mirror as its working directory.
        self.url = url if self._is_remote_spec(url) else os.path.abspath(url)
        self.branch = branch
        self.cache_dir = cache_dir
        self.subdir = "" if str(sub) == "." else str(sub)
        self.require_signed = require_signed
        self.allowed_signers = allowed_signers.resolve() if allowed_signers else None
        self.gpg_home = gpg_home.resolve() if gpg_home else None
        self.timeout_s = timeout_s
        self.mirror = cache_dir / "mirror.git"
        self.snapshots = cache_dir / "snapshots"

    # -- public API -------------------------------------------------------------------------

    def fetch(self) -> str:
        """Force-fetch the branch into the mirror (never merges) and return its head's full sha."""
        self._ensure_mirror()
        ref = f"refs/heads/{self.branch}"
        rc, _, err = self._git(
            "fetch", "--prune", "--no-tags", "--no-write-fetch-head", "--", self.url, f"+{ref}:{ref}"
        )
        where = f"branch {self.branch!r} of {redact(self.url)}"
        if rc != 0:
            if "couldn't find remote ref" in err:
                raise SourceError(f"cannot fetch {where}: the branch does not exist")
            raise SourceError(f"cannot fetch {where}: {_summary(err)}")
        sha = self.last_fetched()
        if sha is None:
            raise SourceError(f"fetched {where} but {ref} is missing from the mirror {self.mirror}")
        return sha

    def last_fetched(self) -> str | None:
        """Sha of the branch head as of the last successful fetch, or None if never fetched."""
        if not (self.mirror / "HEAD").is_file():
            return None
        rc, out, _ = self._git("rev-parse", "--verify", "--quiet", f"refs/heads/{self.branch}^{{commit}}")
        return out.strip() if rc == 0 else None

    def snapshot(self, sha: str) -> Snapshot:
        """Verify (if required) and export exactly commit ``sha``'s tree to ``snapshots/<sha>/``."""
        full = self._resolve(sha)
        if self.require_signed:
            self._verify(full)
        rc, out, err = self._git("show", "-s", "--format=%an <%ae>%x00%B", full)
        if rc != 0:
            raise SourceError(f"cannot read commit {full}: {_summary(err)}")
        author, _, message = out.partition("\0")
        subject = message.strip().splitlines()[0] if message.strip() else ""
        root = self.snapshots / full
        if not root.is_dir():
            self._export(full, root)
        path = root / self.subdir if self.subdir else root
        if not path.is_dir():
            raise SourceError(f"subdir {self.subdir!r} does not exist in commit {full} of {redact(self.url)}")
        return Snapshot(commit=full, path=path, subject=subject, author=author)

    def prune(self, keep: set[str]) -> None:
        """Delete snapshot dirs (and leftover temp dirs) whose sha is not in ``keep``.

        Not meant to run concurrently with :meth:`snapshot` on the same cache_dir.
        """
        if not self.snapshots.is_dir():
            return
        try:
            for entry in self.snapshots.iterdir():
                if (_SHA.fullmatch(entry.name) and entry.name not in keep) or entry.name.startswith(".tmp-"):
                    shutil.rmtree(entry)
        except OSError as exc:
            raise SourceError(f"cannot prune snapshots in {self.snapshots}: {exc}") from None

    @staticmethod
    def is_git_url(repo: str) -> bool:
        """Whether ``repo`` names a git repository (URL, scp-like, ``*.git``, or a repo root dir).

        A plain directory that merely sits inside some other repository's work tree is not one.
        """
        if not repo:
            return False
        if _SCHEME.match(repo) or _SCP_LIKE.match(repo) or repo.rstrip("/").endswith(".git"):
            return True
        p = Path(repo)
        try:
            if not p.is_dir():
                return False
            if (p / ".git").exists():
                return True
            return (p / "HEAD").is_file() and (p / "objects").is_dir() and (p / "refs").is_dir()
        except OSError:
            return False

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _is_remote_spec(url: str) -> bool:
        return bool(_SCHEME.match(url) or _SCP_LIKE.match(url))

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(GIT_TERMINAL_PROMPT="0", GCM_INTERACTIVE="never", LC_ALL="C", LANGUAGE="C")
        env.setdefault("GIT_SSH_COMMAND", _SSH_COMMAND)
        if self.gpg_home is not None:
            env["GNUPGHOME"] = str(self.gpg_home)
        elif self.require_signed:
            # Only allowed_signers may vouch for a commit: no keys from the user's default keyring.
            env["GNUPGHOME"] = str(self.cache_dir / "empty-gnupg")
        return env

    def _git(self, *args: str, cwd: Path | None = None) -> tuple[int, str, str]:
        """Run git in the mirror with a hard timeout; returns (rc, stdout, stderr). Never raises
        anything but SourceError."""
        cmd = ["git", *args]
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd or self.mirror,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise SourceError(f"cannot run git ({args[0]}): {exc.strerror or exc}") from None
        with proc:
            try:
                out, err = proc.communicate(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                where = f"url {redact(self.url)}, branch {self.branch!r}"
                raise SourceError(f"git {args[0]} timed out after {self.timeout_s:g}s ({where})") from None
        return proc.returncode, out.decode("utf-8", "replace"), redact(err.decode("utf-8", "replace"))

    def _ensure_mirror(self) -> None:
        try:
            if not (self.mirror / "HEAD").is_file():
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=".mirror-"))
                try:
                    rc, _, err = self._git("init", "--quiet", "--bare", str(tmp), cwd=self.cache_dir)
                    if rc != 0:
                        raise SourceError(f"cannot create mirror {self.mirror}: {_summary(err)}")
                    tmp.rename(self.mirror)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            attributes = self.mirror / "info" / "attributes"
            if not attributes.is_file() or attributes.read_text() != _RAW_ATTRIBUTES:
                attributes.parent.mkdir(exist_ok=True)
                attributes.write_text(_RAW_ATTRIBUTES)
        except OSError as exc:
            raise SourceError(f"cannot prepare mirror {self.mirror}: {exc}") from None

    def _resolve(self, sha: str) -> str:
        if not _HEX_PREFIX.fullmatch(sha):
            raise SourceError(f"not a commit sha: {sha!r}")
        if not (self.mirror / "HEAD").is_file():
            raise SourceError(f"commit {sha} not available: {redact(self.url)} has not been fetched yet")
        rc, out, _ = self._git("rev-parse", "--verify", "--quiet", f"{sha.lower()}^{{commit}}")
        if rc != 0:
            raise SourceError(f"commit {sha} not found in the mirror of {redact(self.url)}")
        return out.strip()

    def _verify(self, sha: str) -> None:
        signers = str(self.allowed_signers) if self.allowed_signers else os.devnull
        rc, _, err = self._git("-c", f"gpg.ssh.allowedSignersFile={signers}", "verify-commit", sha)
        if rc == 0:
            return
        if not err.strip():
            why = "no signature"
        elif "No principal matched" in err:
            why = f"signing key not in allowed signers ({_summary(err)})"
        else:
            why = _summary(err)
        raise UnsignedCommit(f"commit {sha} rejected, signature required: {why}")

    def _export(self, sha: str, root: Path) -> None:
        """``git archive`` the commit into a temp dir beside ``root`` and rename it into place."""
        try:
            self.snapshots.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.snapshots, prefix=f".tmp-{sha[:12]}-"))
        except OSError as exc:
            raise SourceError(f"cannot create snapshot dir under {self.snapshots}: {exc}") from None
        try:
            tar = tmp / "tree.tar"
            rc, _, err = self._git("archive", "--format=tar", f"--output={tar}", sha)
            if rc != 0:
                raise SourceError(f"cannot export commit {sha}: {_summary(err)}")
            tree = tmp / "tree"
            with tarfile.open(tar) as archive:
                archive.extractall(tree, filter="data")
            tree.chmod(0o755)
            try:
                tree.rename(root)
            except OSError:
                if not root.is_dir():  # else: someone else exported the same commit first
                    raise
        except (OSError, tarfile.TarError) as exc:
            raise SourceError(f"cannot export commit {sha} to {root}: {exc}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _summary(stderr: str, limit: int = 400) -> str:
    """The meaningful lines of git's stderr, on one line."""
    lines = [ln.strip().removeprefix("fatal: ").removeprefix("error: ") for ln in stderr.splitlines()]
    text = "; ".join(ln for ln in lines if ln and not ln.startswith(_GIT_BOILERPLATE)) or "git failed"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tree_commit(path: Path, timeout_s: float = 10.0) -> str:
    """The commit a local desired-state tree comes from (12 hex), ``+dirty`` if it has edits
    below ``path``; ``local`` when it is not in a git work tree (or git is not there)."""
    env = {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=timeout_s, env=env, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    sha = git("rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    if not sha:
        return "local"
    dirty = git("status", "--porcelain", "--untracked-files=normal", "--", ".")
    return sha[:12] + ("+dirty" if dirty else "")
