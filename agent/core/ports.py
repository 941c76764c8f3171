"""The ports: what the node and daemon layers need from the outside world, as Protocols.

Adapters implement them for real (``agent.adapters``); ``agent.testing`` has public fakes,
type-checked against these, for fast tests with no Docker, no git and no sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.core.observed import Observed
from agent.core.stack import ServiceSpec, StackSpec

#: Container events that mean one of ours went away or down (docker's event names).
WATCHED_EVENTS = ("die", "destroy", "oom", "kill")


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """Something happened to one of our containers (one of ``WATCHED_EVENTS``)."""

    action: str
    container: str
    name: str = ""
    #: epoch seconds, as the engine stamped it
    time: float = 0.0


class EventStream(Protocol):
    """Events as they happen. Iterating blocks; it ends when ``close`` is called (from any
    thread) or the engine closes the stream, and raises ``EngineError`` when it breaks."""

    def __iter__(self) -> Iterator[EngineEvent]: ...
    def close(self) -> None: ...


class Engine(Protocol):
    """The container engine, as the executor and the reconcile pass use it. Every failure is
    an ``agent.core.errors.EngineError`` (or a subclass); nothing else escapes."""

    def observe(self, project: str, images: list[str], names: Sequence[str] = ()) -> Observed: ...
    def pull(self, ref: str) -> str: ...
    def image_id(self, ref: str) -> str | None: ...
    def ensure_network(self, name: str, project: str, network: str, driver: str) -> None: ...
    def ensure_volume(self, name: str, project: str, volume: str, driver: str) -> None: ...
    def remove_network(self, name: str) -> None: ...
    def create(self, stack: StackSpec, spec: ServiceSpec, name: str, labels: dict[str, str], stack_dir: str) -> str: ...
    def start(self, cid: str) -> None: ...
    def stop(self, cid: str, timeout: int | None = None) -> None: ...
    def restart(self, cid: str, timeout: int = 10) -> None: ...
    def signal(self, cid: str, sig: str) -> None: ...
    def rename(self, cid: str, name: str) -> None: ...
    def remove(self, cid: str, grace_s: int | None = None, graceful: bool = False) -> None: ...
    def state(self, cid: str) -> tuple[str, str | None, int]:
        """(status, health or None, exit code) of one container."""
        ...

    def probe_passed_since(self, cid: str, since: float) -> bool: ...
    def logs_tail(self, cid: str, lines: int = 5) -> str: ...
    def events(self, project: str) -> EventStream:
        """The ``WATCHED_EVENTS`` of containers with our owner label in ``project``."""
        ...

    def close(self) -> None: ...


class Clock(Protocol):
    """Time, as the executor and the daemon read and spend it."""

    def monotonic(self) -> float: ...
    def time(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Secrets(Protocol):
    """Secret references resolved to values (the render step's only way to a value)."""

    def declared(self, name: str) -> bool:
        """Some source has the name (no decryption: safe for ``validate``)."""
        ...

    def where(self, name: str) -> str: ...
    def value(self, name: str) -> str: ...
    def known_values(self) -> list[str]:
        """Values resolved so far: what must never leak into a non-secret file or a message."""
        ...


@dataclass(frozen=True, slots=True)
class Checkout:
    """The desired state a pass reconciles: an exact commit and the directory holding it."""

    commit: str
    path: Path
    #: the source could not be updated (remote unreachable): ``commit`` is the last good one
    problem: str | None = None


class DesiredSource(Protocol):
    """Where the desired state comes from (a git remote, a plain directory, a fake)."""

    description: str

    def current(self, last_good: str | None) -> Checkout:
        """The commit to reconcile now. Raises ``AgentError`` when there is none (the remote is
        unreachable and nothing was ever applied)."""
        ...

    def snapshot_of(self, commit: str) -> Path | None:
        """The tree of an earlier commit (to heal on the last good one), or None if this source
        keeps no history."""
        ...
