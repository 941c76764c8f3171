"""The agent's own error hierarchy and the ``Problem`` record every check reports.

Every error a user can cause carries the file and line it comes from, so the CLI can print
``file:line: what`` and never a traceback. Adapters map their libraries' exceptions onto
these classes; nothing from PyYAML, Jinja2, pydantic or docker escapes them.

    AgentError
    ├── DesiredStateError      (holds one or more Problems: YAML, schema, template, lint)
    ├── SecretError            (a secret reference that cannot be resolved or decrypted)
    ├── ConfigError            (the agent's own configuration file / environment)
    └── EngineError            (the container engine; raised by the Docker adapter and fakes)
        ├── EngineUnavailable  (cannot be reached)
        ├── ImageUnavailable   (neither present nor pullable)
        ├── NotFound           (the container/network named is gone)
        └── NetworkInUse       (a network still has endpoints)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

#: ``info``: an explanation ``agent validate`` prints (never a reason to refuse anything).
Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about the desired state, located as precisely as we can."""

    file: str
    line: int | None
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        prefix = {"error": "", "warning": "warning: ", "info": "note: "}[self.severity]
        return f"{where}: {prefix}{self.message}"


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class DesiredStateError(AgentError):
    """The desired state cannot be used; ``problems`` says exactly where and why."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, file: str, line: int | None, message: str) -> DesiredStateError:
        return cls([Problem(file, line, message)])


class SecretError(AgentError):
    """A secret reference could not be resolved (missing, undecryptable, bad identity)."""


class ConfigError(AgentError):
    """The agent's own configuration (TOML file or ``AGENT_*`` variables) is wrong."""


class EngineError(AgentError):
    """The container engine refused or failed an operation; the message names the operation."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached at all (the daemon drops its client and reconnects)."""


class ImageUnavailable(EngineError):
    """An image is neither present nor pullable."""


class NotFound(EngineError):
    """The container or network an operation named is gone."""


class NetworkInUse(EngineError):
    """A network still has endpoints (another container uses it): left for a later pass."""


def error_line(exc: BaseException) -> str:
    """``Type: message`` on one line: how an unexpected error is shown, CLI and journal alike."""
    message = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
