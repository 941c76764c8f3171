"""The agent's persistent state in its state dir: applied commit, recent runs, quarantine.

One JSON document, written atomically (temp file, fsync, rename), so a ``kill -9`` at any
instant leaves either the old or the new state, never a torn one. Owned by the reconcile
pass; ``agent status`` reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, Field, ValidationError

from agent.adapters.fs import UnsafePath, locked, private_dir, write_atomic
from agent.core.outcomes import Failure, PassOutcome

log = structlog.get_logger("agent.state")

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


class StateReset(BaseModel):
    """A state file that could not be read was set aside and the agent started afresh."""

    at: float
    reason: str
    #: the file name it was moved to (None: it could not be moved)
    aside: str | None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))
        where = f"set aside as {self.aside}" if self.aside else "could not be set aside"
        return f"state.json was corrupt ({self.reason}) at {when}; {where}; started from a fresh state"


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
    #: set when a corrupt state file was replaced by a fresh state (``agent status`` says so)
    reset: StateReset | None = None

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
        """The state; a corrupt file is set aside (``state.json.corrupt-<time>``, once, with a
        warning) and a fresh state returned, so the agent keeps healing (it re-applies)."""
        if not self.path.is_file():
            return AgentState()
        try:
            return AgentState.model_validate(json.loads(self.path.read_text()))
        except (ValueError, ValidationError) as exc:
            return self._set_aside(type(exc).__name__)

    def _set_aside(self, reason: str) -> AgentState:
        at = now()
        aside: Path | None = self.path.with_name(
            f"state.json.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(at))}"
        )
        try:
            os.rename(self.path, aside)  # type: ignore[arg-type]
        except FileNotFoundError:  # another reader set it aside first
            return self.load()
        except OSError:
            aside = None
        fresh = AgentState(reset=StateReset(at=at, reason=reason, aside=aside.name if aside else None))
        log.warning(
            "state file corrupt; starting from a fresh state", path=str(self.path), aside=str(aside), reason=reason
        )
        if aside is not None:
            self._save_if_absent(fresh)
        return fresh

    def _save_if_absent(self, state: AgentState) -> None:
        """Write ``state`` unless a state file appeared meanwhile (a pass's own write wins)."""
        tmp = self.dir / f".state.json.{os.getpid()}.fresh"
        with contextlib.suppress(OSError, UnsafePath):
            private_dir(self.dir)
            write_atomic(tmp, state.model_dump_json(indent=1).encode(), 0o600)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.path)
        with contextlib.suppress(OSError):
            tmp.unlink()

    def save(self, state: AgentState) -> None:
        private_dir(self.dir)
        write_atomic(self.path, state.model_dump_json(indent=1).encode(), 0o600)

    def stack_dir(self, project: str) -> Path:
        return self.dir / "stacks" / project


def now() -> float:
    return time.time()
