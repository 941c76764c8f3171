"""The agent's own settings: one typed object, passed explicitly, never a global.

Read from a TOML file (default ``/etc/llm-agent/agent.toml``); every key can be overridden by
an environment variable ``AGENT_<KEY>`` (``AGENT_HOST``, ``AGENT_REPO`` ...), and CLI flags
override both.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.core.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/llm-agent/agent.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: A compose project / container name prefix: it becomes part of a directory name under the
#: state dir and of engine object names, so no path separators, dots or upper case.
MAX_PREFIX = 20
PREFIX_RE = re.compile(rf"(?:[a-z0-9][a-z0-9_-]{{0,{MAX_PREFIX - 1}}})?")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: This host's identity in the fleet (a file ``hosts/<host>.yaml``); like a Salt minion id.
    host: str = Field(default_factory=lambda: _hostname())  # noqa: PLW0108 (defined below)
    #: Desired-state repository: a git URL (file://, ssh, https, or a repo's own directory),
    #: or a plain directory read as it is (local runs). The shipped example by default.
    repo: str = "desired_state"
    branch: str = "main"
    #: Where the desired state (fleet.yaml) sits inside the repository.
    repo_subdir: str = ""
    #: Refuse commits not signed by an allowed key (``git verify-commit``): ssh signatures are
    #: checked against ``allowed_signers``, gpg ones against the keyring in ``gpg_home``.
    require_signed_commits: bool = False
    allowed_signers: Path | None = None
    gpg_home: Path | None = None
    #: Where the agent keeps its state (applied commit, runs, quarantine) and stack files.
    state_dir: Path = Path("/var/lib/llm-agent")
    #: Seconds between reconcile passes; a random splay of up to ``splay`` s is added.
    interval: float = Field(30.0, gt=0)
    splay: float = Field(5.0, ge=0)
    #: Cap, in seconds, on waiting for one service to become healthy during a pass.
    #: At least 1 s: below that a healthy service fails its first check and is rolled back.
    health_timeout: float | None = Field(None, ge=1, allow_inf_nan=False)
    #: A pass running longer than this stops feeding the systemd watchdog (the agent restarts).
    pass_timeout: float = Field(1800.0, gt=0)
    #: One of ``LOG_LEVELS`` (any case); ``debug`` also puts tracebacks into the journal.
    log_level: str = "info"
    #: The fleet API on motoko that node agents report to.
    motoko_url: str | None = None
    #: Prefix of compose projects and container names, so several agents share one engine.
    project_prefix: str = ""
    #: Host-local secrets (name: value, mode 0600) and the age identity for ``secrets/*.age``.
    secrets_file: Path = Path("/etc/llm-agent/secrets.yaml")
    identity_file: Path = Path("/etc/llm-agent/identity.txt")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"'{value}' is not a log level; use one of {', '.join(LOG_LEVELS)}")
        return value.lower()

    @field_validator("project_prefix")
    @classmethod
    def _safe_prefix(cls, value: str) -> str:
        if not PREFIX_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a usable prefix: lowercase letters, digits, '-' and '_', "
                f"starting with a letter or digit, at most {MAX_PREFIX} characters"
            )
        return value

    @property
    def socket_path(self) -> Path:
        """The daemon's local control API (owner-only Unix socket)."""
        return self.state_dir / "agent.sock"


def _hostname() -> str:
    return socket.gethostname().split(".")[0].lower()


def load_settings(path: Path | None = None, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    file = path or Path(environ.get("AGENT_CONFIG", DEFAULT_CONFIG))
    data: dict[str, Any] = {}
    if file.is_file():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    elif path is not None:
        raise ConfigError(f"{file}: configuration file not found")
    for key in Settings.model_fields:
        env_key = f"AGENT_{key.upper()}"
        if env_key in environ:
            data[key] = environ[env_key]
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        raise ConfigError(f"{file} / AGENT_* environment: " + "; ".join(lines)) from None
