"""Secret references (``{secret: NAME}``) and where their values come from.

Sources, asked in this order (the first that has the name wins):

1. the environment: ``AGENT_SECRET_<NAME>`` (upper-case), for tests and one-off runs;
2. a host-local YAML file (``name: value``, mode 0600), default ``/etc/llm-agent/secrets.yaml``;
3. the desired-state repository's ``secrets/<name>.age``, age-encrypted to the host's
   identity (``/etc/llm-agent/identity.txt``), decrypted with pyrage (the reference
   implementation's Rust core; hand-rolled crypto has no place here).

A value never appears in an error message, a log line or a rendered file other than the
0600 secret files (the env file, the gateway's proxy config).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.core.errors import DesiredStateError, Problem, SecretError
from agent.core.redact import REDACTED
from agent.core.yamlsrc import load

__all__ = ["REDACTED", "SecretResolver", "encrypt_secret", "keygen"]


class SecretSource(Protocol):
    def has(self, name: str) -> bool: ...
    def get(self, name: str) -> str | None: ...
    def describe(self, name: str) -> str: ...


class EnvSecrets:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    @staticmethod
    def var(name: str) -> str:
        return f"AGENT_SECRET_{name.upper()}"

    def has(self, name: str) -> bool:
        return self.var(name) in self.environ

    def get(self, name: str) -> str | None:
        return self.environ.get(self.var(name))

    def describe(self, name: str) -> str:
        return f"${self.var(name)}"


class FileSecrets:
    """A host-local ``name: value`` YAML file; read lazily, once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._data is None:
            if not self.path.is_file():
                self._data = {}
                return self._data
            mode = stat.S_IMODE(self.path.stat().st_mode)
            if mode & 0o077:
                raise SecretError(f"{self.path}: secrets file is readable by others (mode {mode:04o}); chmod 600 it")
            try:  # the bounded loader (size, depth, aliases); its messages may quote values: not shown
                data = load(self.path.read_text(encoding="utf-8"), str(self.path)).data or {}
            except (DesiredStateError, UnicodeDecodeError):
                raise SecretError(f"{self.path}: not valid YAML (name: value per line)") from None
            if not isinstance(data, dict):
                raise SecretError(f"{self.path}: must be a mapping of name: value")
            self._data = {str(k): str(v) for k, v in data.items()}
        return self._data

    def has(self, name: str) -> bool:
        return name in self._load()

    def get(self, name: str) -> str | None:
        return self._load().get(name)

    def describe(self, name: str) -> str:
        return f"{self.path}"


class AgeSecrets:
    """``secrets/<name>.age`` in the desired-state repo, decrypted with the host identity."""

    def __init__(self, directory: Path, identity: Path | None) -> None:
        self.directory = directory
        self.identity = identity
        #: Names this source was asked for and has: what the identity must be able to open.
        self.referenced: set[str] = set()

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.age"

    def has(self, name: str) -> bool:
        found = self.path(name).is_file()
        if found:
            self.referenced.add(name)
        return found

    def identity_problems(self) -> list[Problem]:
        """A present but unusable identity, when referenced secrets need it (no decryption).

        A missing identity is not a problem here: ``validate`` runs anywhere, the host key
        lives only on the host."""
        if not self.referenced or self.identity is None or not self.identity.is_file():
            return []
        try:
            load_identity(self.identity)
        except SecretError as exc:
            needed = ", ".join(f"secrets/{n}.age" for n in sorted(self.referenced))
            what = str(exc).removeprefix(f"{self.identity}: ")
            return [Problem(str(self.identity), None, f"{what} (needed for {needed})")]
        return []

    def get(self, name: str) -> str | None:
        if not self.has(name):
            return None
        if self.identity is None or not self.identity.is_file():
            raise SecretError(
                f"secrets/{name}.age cannot be decrypted: no identity file "
                f"({self.identity or 'none configured'}); see 'agent keygen'"
            )
        import pyrage

        ident = load_identity(self.identity)
        try:
            return str(pyrage.decrypt(self.path(name).read_bytes(), [ident]).decode("utf-8")).rstrip("\n")
        except (pyrage.DecryptError, ValueError, UnicodeDecodeError) as exc:
            raise SecretError(
                f"secrets/{name}.age cannot be decrypted with {self.identity} "
                f"(encrypted to another recipient?): {type(exc).__name__}"
            ) from None

    def describe(self, name: str) -> str:
        return f"secrets/{name}.age"


def load_identity(path: Path) -> Any:
    """The age identity in ``path`` (a ``pyrage.x25519.Identity``); SecretError if unusable."""
    import pyrage

    text = _read_text(path, "identity file")
    line = next((x.strip() for x in text.splitlines() if x.startswith("AGE-SECRET-KEY-")), None)
    if line is None:
        raise SecretError(f"{path}: no AGE-SECRET-KEY line")
    try:
        return pyrage.x25519.Identity.from_str(line)
    except pyrage.IdentityError as exc:
        raise SecretError(f"{path}: not a valid age identity ({exc}); see 'agent keygen'") from None


def _read_text(path: Path, what: str) -> str:
    """A small UTF-8 text file (identity, recipients), errors as one SecretError line."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SecretError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise SecretError(f"{path}: cannot read {what}: {exc.strerror}") from None


@dataclass
class SecretResolver:
    """Resolves references through the sources above; caches decrypted values in memory."""

    sources: list[SecretSource]
    #: Called with every value resolved (the daemon feeds its log redactor with it).
    on_resolve: Callable[[str], None] | None = None
    _cache: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def for_repo(
        cls,
        repo: Path,
        secrets_file: Path | None = None,
        identity: Path | None = None,
        on_resolve: Callable[[str], None] | None = None,
    ) -> SecretResolver:
        return cls(
            [
                EnvSecrets(),
                FileSecrets(secrets_file or Path("/etc/llm-agent/secrets.yaml")),
                AgeSecrets(repo / "secrets", identity or Path("/etc/llm-agent/identity.txt")),
            ],
            on_resolve,
        )

    def declared(self, name: str) -> bool:
        """True if some source has the name (no decryption: safe for ``validate``)."""
        return any(source.has(name) for source in self.sources)

    def identity_problems(self) -> list[Problem]:
        """Problems of the age identity that referenced secrets need (see ``AgeSecrets``)."""
        return [p for s in self.sources if isinstance(s, AgeSecrets) for p in s.identity_problems()]

    def where(self, name: str) -> str:
        return ", ".join(source.describe(name) for source in self.sources)

    def value(self, name: str) -> str:
        if name in self._cache:
            return self._cache[name]
        for source in self.sources:
            if source.has(name):
                value = source.get(name)
                if value is not None:
                    if "\n" in value or "\x00" in value:
                        raise SecretError(f"secret '{name}' ({source.describe(name)}) contains a newline or NUL byte")
                    self._cache[name] = value
                    if self.on_resolve is not None:
                        self.on_resolve(value)
                    return value
        raise SecretError(f"secret '{name}' not found (looked in {self.where(name)})")

    def remember(self, label: str, value: str) -> None:
        """A secret value learned elsewhere (the previous bearer token, read back from the
        proxy config on disk): hidden, refused and redacted like a resolved one."""
        key = f"({label})"
        if value and self._cache.get(key) != value:
            self._cache[key] = value
            if self.on_resolve is not None:
                self.on_resolve(value)

    def known_values(self) -> list[str]:
        """Values resolved so far: what must never leak into a non-secret file."""
        return list(self._cache.values())


def keygen(path: Path) -> str:
    """Create an age identity (mode 0600, refusing to overwrite one); returns its public key."""
    import pyrage

    if path.exists():
        raise SecretError(f"{path} already exists; not overwriting an identity")
    ident = pyrage.x25519.Identity.generate()
    recipient = str(ident.to_public())
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"# llm-agent host identity; public key: {recipient}\n{ident}\n")
    except OSError as exc:
        raise SecretError(f"{path}: cannot write the identity: {exc.strerror or exc}") from None
    return recipient


def encrypt_secret(repo: Path, name: str, value: str, recipients_file: Path | None = None) -> Path:
    """Encrypt ``value`` to every recipient of the repo; writes ``secrets/<name>.age``."""
    import re

    import pyrage

    if not re.match(r"^[a-z0-9][a-z0-9_]*$", name):
        raise SecretError(f"secret name '{name}' must be lowercase letters, digits and '_'")
    if not value:
        raise SecretError("empty value: pipe the secret on standard input")
    rfile = recipients_file or repo / "secrets" / "recipients.txt"
    if not rfile.is_file():
        raise SecretError(f"{rfile}: no recipients file (one age public key per line)")
    text = _read_text(rfile, "recipients file")
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    try:
        recipients = [pyrage.x25519.Recipient.from_str(k) for k in keys]
    except pyrage.RecipientError:
        raise SecretError(f"{rfile}: a line is not an age public key (age1...)") from None
    if not recipients:
        raise SecretError(f"{rfile}: no recipients")
    out = repo / "secrets" / f"{name}.age"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(pyrage.encrypt(value.encode(), recipients))
    except OSError as exc:
        raise SecretError(f"{out}: cannot write: {exc.strerror or exc}") from None
    return out
