"""Typed outcomes passed between layers: what an action is, how a health wait ended, how a
pass ended and why it failed. Decisions are made on these, never on message text.

They are ``StrEnum``s: they print, compare and serialise as the strings the JSON outputs and
the state file have always used.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ActionKind(StrEnum):
    CREATE_NETWORK = "create_network"
    WRITE_FILE = "write_file"  # a stack file on disk differs from the desired one
    PULL = "pull"
    CREATE = "create"
    RECREATE = "recreate"
    START = "start"
    RELOAD = "reload"
    RESTART = "restart"
    REMOVE = "remove"
    REMOVE_NETWORK = "remove_network"
    CONFLICT = "conflict"
    NOOP = "noop"


#: Kinds that change something on the engine.
MUTATING = frozenset(k for k in ActionKind if k not in (ActionKind.CONFLICT, ActionKind.NOOP))


class PassOutcome(StrEnum):
    CONVERGED = "converged"
    PENDING = "changes-pending"  # a dry run found work to do
    FAILED = "failed"


class Failure(StrEnum):
    """Why a pass failed (``None`` on a pass that did not)."""

    SOURCE = "source"  # the desired-state repository cannot be fetched
    DESIRED_STATE = "desired-state"  # YAML, schema, template, lint
    SECRET = "secret"
    CONFIG = "config"  # the agent's own configuration
    ENGINE_UNAVAILABLE = "engine-unavailable"
    ENGINE = "engine"  # the engine refused an operation
    ROLLOUT = "rollout"  # a new version did not come up (rolled back)
    STOPPED = "stopped"  # the agent was shutting down mid-rollout (rolled back, not quarantined)
    DRAIN = "drain"  # motoko granted no drain lease in time: nothing replaced, asked again later
    CONFLICT = "conflict"  # a container we do not own holds a name we need
    QUARANTINED = "quarantined"  # this desired state failed before; not retried
    NOT_CONVERGED = "not-converged"  # applied, but the verification found work left
    LOCKED = "locked"  # another pass holds the host
    STATE = "state"  # the state directory (disk full, permissions)
    INTERNAL = "internal"  # a bug


class WaitEnd(StrEnum):
    """How waiting for a container to become healthy ended."""

    HEALTHY = "healthy"  # healthy, or running without a healthcheck
    EXITED = "exited"
    RESTART_LOOP = "restart-loop"
    UNHEALTHY = "unhealthy"
    TIMEOUT = "timeout"
    STOPPING = "stopping"  # the agent is shutting down: abandoned, not the version's fault


@dataclass(frozen=True, slots=True)
class HealthWait:
    end: WaitEnd
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.end is WaitEnd.HEALTHY

    @property
    def crashed(self) -> bool:
        """A crash is not a hang: restarting it will not help."""
        return self.end in (WaitEnd.EXITED, WaitEnd.RESTART_LOOP)

    def __str__(self) -> str:
        return self.detail or str(self.end)
