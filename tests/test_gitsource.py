"""GitSource against real git repositories on local disk (no network)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.adapters.gitsource import GitSource, Snapshot, SourceError, UnsignedCommit
from agent.core.errors import AgentError

pytestmark = pytest.mark.slow  # runs git: real external processes


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return out.stdout.strip()


@dataclass
class Remote:
    """A bare repository (the "remote") and a working clone used to push to it."""

    bare: Path
    work: Path

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    def commit(self, files: dict[str, str], message: str, *sign: str) -> str:
        for name, text in files.items():
            (self.work / name).parent.mkdir(parents=True, exist_ok=True)
            (self.work / name).write_text(text)
        git(self.work, "add", "-A")
        git(self.work, *sign, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "--force", "origin", "HEAD:main")
        return git(self.work, "rev-parse", "HEAD")


@pytest.fixture(autouse=True)
def _hermetic_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No host git config; fixed identities so commits are reproducible."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Test Author")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "author@example.test")
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    work = tmp_path / "work"
    git(tmp_path, "init", "-q", "-b", "main", str(work))
    git(work, "remote", "add", "origin", str(bare))
    return Remote(bare, work)


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fetch_and_snapshot_hold_exactly_the_committed_tree(remote: Remote, tmp_path: Path) -> None:
    (remote.work / "run.sh").write_text("#!/bin/sh\n")
    (remote.work / "run.sh").chmod(0o755)
    # export-ignore / ident must not alter the snapshot: it is the committed tree, byte for byte.
    files = {"hosts/a.yaml": "a: 1\n", "ign.txt": "$Id$\n", ".gitattributes": "ign.txt export-ignore ident\n"}
    sha = remote.commit(files, "first line\n\nbody")
    (remote.work / "untracked.yaml").write_text("no\n")
    (remote.work / "hosts" / "a.yaml").write_text("edited, not committed\n")

    src = GitSource(remote.url, "main", tmp_path / "cache")
    assert src.last_fetched() is None
    assert src.fetch() == sha
    assert src.last_fetched() == sha
    snap = src.snapshot(sha)
    assert snap == Snapshot(
        commit=sha,
        path=tmp_path / "cache" / "snapshots" / sha,
        subject="first line",
        author="Test Author <author@example.test>",
    )
    assert tree(snap.path) == {**files, "run.sh": "#!/bin/sh\n"}
    assert (snap.path / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (snap.path / "hosts" / "a.yaml").stat().st_mode & 0o777 == 0o644
    assert src.snapshot(sha[:12]) == snap  # reused, abbreviated sha resolved to the full one
    assert [p.name for p in (tmp_path / "cache" / "snapshots").iterdir()] == [sha]  # no temp dirs left


def test_plain_path_and_subdir(remote: Remote, tmp_path: Path) -> None:
    sha = remote.commit({"desired_state/hosts/a.yaml": "a\n", "README": "x\n"}, "add")
    src = GitSource(str(remote.bare), "main", tmp_path / "cache", subdir="desired_state/")
    assert src.fetch() == sha
    snap = src.snapshot(sha)
    assert snap.path == tmp_path / "cache" / "snapshots" / sha / "desired_state"
    assert tree(snap.path) == {"hosts/a.yaml": "a\n"}

    missing = GitSource(str(remote.bare), "main", tmp_path / "cache", subdir="nope")
    with pytest.raises(SourceError, match=r"subdir 'nope' does not exist in commit " + sha):
        missing.snapshot(sha)
    with pytest.raises(SourceError, match="relative path"):
        GitSource(str(remote.bare), "main", tmp_path / "cache", subdir="../etc")


def test_new_commits_and_force_push_are_followed(remote: Remote, tmp_path: Path) -> None:
    first = remote.commit({"a": "1\n"}, "one")
    src = GitSource(remote.url, "main", tmp_path / "cache")
    assert src.fetch() == first
    second = remote.commit({"a": "2\n"}, "two")
    assert src.fetch() == second
    assert (src.snapshot(second).path / "a").read_text() == "2\n"
    git(remote.work, "reset", "-q", "--hard", first)
    git(remote.work, "push", "-q", "--force", "origin", "HEAD:main")
    assert src.fetch() == first
    assert (src.snapshot(first).path / "a").read_text() == "1\n"


def test_unreachable_remote_then_back(remote: Remote, tmp_path: Path) -> None:
    sha = remote.commit({"a": "1\n"}, "one")
    src = GitSource(remote.url, "main", tmp_path / "cache")
    assert src.fetch() == sha
    moved = tmp_path / "elsewhere.git"
    remote.bare.rename(moved)
    with pytest.raises(SourceError) as err:
        src.fetch()
    assert remote.url in str(err.value)
    assert src.last_fetched() == sha
    moved.rename(remote.bare)
    assert src.fetch() == sha


def test_missing_branch(remote: Remote, tmp_path: Path) -> None:
    remote.commit({"a": "1\n"}, "one")
    src = GitSource(remote.url, "release", tmp_path / "cache")
    with pytest.raises(SourceError, match=r"branch 'release' .*does not exist"):
        src.fetch()
    assert src.last_fetched() is None


def test_garbage_inputs_raise_source_error_only(remote: Remote, tmp_path: Path) -> None:
    sha = remote.commit({"a": "1\n"}, "one")
    with pytest.raises(SourceError):
        GitSource("::not a url::", "main", tmp_path / "c1").fetch()
    with pytest.raises(SourceError, match="not a commit sha"):
        GitSource(remote.url, "main", tmp_path / "c1").snapshot("HEAD; rm -rf /")
    with pytest.raises(SourceError, match="not been fetched"):
        GitSource(remote.url, "main", tmp_path / "c2").snapshot(sha)
    src = GitSource(remote.url, "main", tmp_path / "c3")
    src.fetch()
    with pytest.raises(SourceError, match="not found"):
        src.snapshot("0" * 40)
    with pytest.raises(SourceError, match="invalid branch"):
        GitSource(remote.url, "--upload-pack=x", tmp_path / "c4")
    with pytest.raises(SourceError, match="needs allowed_signers or gpg_home"):
        GitSource(remote.url, "main", tmp_path / "c5", require_signed=True)
    # Every one of these is an AgentError: the daemon catches one base class.
    assert issubclass(UnsignedCommit, SourceError)
    assert issubclass(SourceError, AgentError)


def test_credentials_redacted_and_unreachable_https_fails_fast(tmp_path: Path) -> None:
    url = "https://user:secret@127.0.0.1:9/repo.git"
    src = GitSource(url, "main", tmp_path / "cache", timeout_s=10)
    started = time.monotonic()
    with pytest.raises(SourceError) as err:
        src.fetch()
    assert time.monotonic() - started < 10
    assert "secret" not in str(err.value)
    assert "https://***@127.0.0.1:9/repo.git" in str(err.value)
    assert "secret" not in (tmp_path / "cache" / "mirror.git" / "config").read_text()


def test_hanging_remote_times_out(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts the connection, never answers
        port = server.getsockname()[1]
        src = GitSource(f"git://127.0.0.1:{port}/repo.git", "main", tmp_path / "cache", timeout_s=1)
        started = time.monotonic()
        with pytest.raises(SourceError, match=r"git fetch timed out after 1s .*branch 'main'"):
            src.fetch()
        assert time.monotonic() - started < 5


def test_prune(remote: Remote, tmp_path: Path) -> None:
    first = remote.commit({"a": "1\n"}, "one")
    second = remote.commit({"a": "2\n"}, "two")
    src = GitSource(remote.url, "main", tmp_path / "cache")
    src.fetch()
    src.snapshot(first)
    src.snapshot(second)
    (tmp_path / "cache" / "snapshots" / ".tmp-leftover").mkdir()
    src.prune({second})
    assert [p.name for p in (tmp_path / "cache" / "snapshots").iterdir()] == [second]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(allowed key, other key, allowed_signers file listing only the allowed key)."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    made = []
    for name in ("allowed", "other"):
        key = tmp_path / f"{name}_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
        made.append(key)
    signers = tmp_path / "allowed_signers"
    signers.write_text(f"author@example.test {Path(f'{made[0]}.pub').read_text()}")
    return made[0], made[1], signers


def signed_by(key: Path) -> tuple[str, ...]:
    return ("-c", "gpg.format=ssh", "-c", f"user.signingkey={key}.pub", "-c", "commit.gpgsign=true")


def test_signed_commits(remote: Remote, tmp_path: Path, keys: tuple[Path, Path, Path]) -> None:
    allowed, other, signers = keys
    src = GitSource(remote.url, "main", tmp_path / "cache", require_signed=True, allowed_signers=signers)

    good = remote.commit({"a": "1\n"}, "signed", *signed_by(allowed))
    assert src.snapshot(src.fetch()).commit == good

    unsigned = remote.commit({"a": "2\n"}, "unsigned")
    assert src.fetch() == unsigned  # fetching is fine; using it is not
    with pytest.raises(UnsignedCommit, match=f"commit {unsigned} .*no signature"):
        src.snapshot(unsigned)

    foreign = remote.commit({"a": "3\n"}, "foreign", *signed_by(other))
    with pytest.raises(UnsignedCommit, match=f"commit {foreign} .*not in allowed signers"):
        src.snapshot(src.fetch())
    assert not (tmp_path / "cache" / "snapshots" / foreign).exists()


@pytest.mark.parametrize(
    ("repo", "expected"),
    [
        ("git@github.com:org/repo.git", True),
        ("deploy@git.example.com:fleet", True),
        ("https://github.com/org/repo", True),
        ("ssh://git@host:2222/org/repo", True),
        ("file:///srv/repo", True),
        ("git://host/repo", True),
        ("/srv/somewhere/fleet.git", True),
        ("", False),
        ("desired_state", False),
        ("/no/such/dir", False),
    ],
)
def test_is_git_url_strings(repo: str, expected: bool) -> None:
    assert GitSource.is_git_url(repo) is expected


def test_is_git_url_directories(remote: Remote, tmp_path: Path) -> None:
    inside = remote.work / "desired_state"
    inside.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    assert GitSource.is_git_url(str(remote.bare)) is True
    assert GitSource.is_git_url(str(remote.work)) is True
    assert GitSource.is_git_url(str(inside)) is False
    assert GitSource.is_git_url(str(plain)) is False
