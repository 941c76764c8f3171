"""The agent's persistent state in its state dir: applied commit, recent runs, quarantine.

One JSON document, written atomically (temp file, fsync, rename), so a ``kill -9`` at any
instant leaves either the old or the new state, never a torn one. Owned by the reconcile
pass; ``agent status`` reads it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from agent.adapters.fs import locked, private_dir, write_atomic
from agent.core.errors import ConfigError
from agent.core.outcomes import Failure, PassOutcome

MAX_RUNS = 20
MAX_QUARANTINE = 20


class Run(BaseModel):
    id: str
    started: float
    finished: float
    result: PassOutcome
    failure: Failure | None = None
    commit: str
    error: str | None = None
    actions: list[dict[str, Any]] = Field(default_factory=list)


class Quarantined(BaseModel):
    commit: str
    reason: str
    at: float


class Pause(BaseModel):
    reason: str
    at: float


class AgentState(BaseModel):
    #: the host this state belongs to (``agent status`` names it, not the machine's hostname)
    host: str | None = None
    applied_commit: str | None = None
    applied_fingerprint: str | None = None
    runs: list[Run] = Field(default_factory=list)
    #: desired-state fingerprint -> why it is not retried
    quarantine: dict[str, Quarantined] = Field(default_factory=dict)
    paused: Pause | None = None
    #: as last seen, so ``agent status`` can show them while the daemon is down
    role: str | None = None
    services: dict[str, dict[str, str | None]] = Field(default_factory=dict)

    def record(self, run: Run) -> None:
        self.runs = [*self.runs, run][-MAX_RUNS:]
        # Keep the most recent quarantine entries only.
        if len(self.quarantine) > MAX_QUARANTINE:
            keep = sorted(self.quarantine.items(), key=lambda kv: kv[1].at)[-MAX_QUARANTINE:]
            self.quarantine = dict(keep)


class StateStore:
    """Reads and updates ``state.json``. ``update`` is the only way to change it: a
    read-modify-write under a thread lock and an ``flock`` (the daemon's control thread, its
    pass thread and a CLI ``agent apply`` never lose each other's writes)."""

    _thread_lock = threading.Lock()

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"

    def update(self, change: Callable[[AgentState], None]) -> AgentState:
        private_dir(self.dir)
        with self._thread_lock, locked(self.dir / "state.lock", "state update", wait=True):
            state = self.load()
            change(state)
            self.save(state)
            return state

    def load(self) -> AgentState:
        if not self.path.is_file():
            return AgentState()
        try:
            return AgentState.model_validate(json.loads(self.path.read_text()))
        except (ValueError, ValidationError) as exc:
            raise ConfigError(
                f"{self.path}: unreadable state ({type(exc).__name__}); move it aside to start fresh"
            ) from None

    def save(self, state: AgentState) -> None:
        private_dir(self.dir)
        write_atomic(self.path, state.model_dump_json(indent=1).encode(), 0o600)

    def stack_dir(self, project: str) -> Path:
        return self.dir / "stacks" / project


def now() -> float:
    return time.time()
