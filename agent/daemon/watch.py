"""Drift does not wait for the next interval: the engine's events for our own containers
(die, destroy, oom, kill of containers with our owner label in this host's project) ask for a
pass at once.

One thread reads the stream (its own engine connection, so a pass dropping its engine does
not end it); a burst of events is debounced into one request. An event that arrives while a
pass runs (most likely caused by that pass's own replacements) only asks for one more pass
after it, which the daemon coalesces (``Daemon.trigger``): a pass's own events cost at most
one extra pass, which finds nothing to do (a burst that a pass began after is dropped: that
pass saw what it did). A broken or ended stream is reopened with
exponential backoff; the stop event (or ``close``) ends it all.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from agent.core.errors import EngineError
from agent.core.ports import Engine, EngineEvent, EventStream

log = structlog.get_logger("agent.watch")


@dataclass(frozen=True)
class Timing:
    #: a burst of events within this many seconds asks for one pass
    debounce_s: float = 0.5
    #: reopening a broken stream: first wait, longest wait (doubling in between)
    backoff_s: tuple[float, float] = (1.0, 30.0)


class EventWatcher:
    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        project: str,
        on_drift: Callable[[], object],
        stop: threading.Event,
        *,
        busy: Callable[[], bool] = lambda: False,
        last_pass_began: Callable[[], float] = lambda: 0.0,
        timing: Timing | None = None,
    ) -> None:
        self.engine_factory = engine_factory
        self.project = project
        self.on_drift = on_drift
        self.stop_event = stop
        self.busy = busy
        #: when (``time.monotonic``) the latest pass began: a pass that began after an event
        #: observed what the event did, so the event needs no pass of its own
        self.last_pass_began = last_pass_began
        timing = timing or Timing()
        self.debounce_s = timing.debounce_s
        self.backoff_s = timing.backoff_s
        #: how many times the stream was opened (tests, status)
        self.connections = 0
        self._lock = threading.Lock()
        self._stream: EventStream | None = None
        self._timer: threading.Timer | None = None
        self._burst_at = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> EventWatcher:
        self._thread = threading.Thread(target=self.run, name="engine-events", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop watching (the stop event is set by the caller, or here)."""
        self.stop_event.set()
        with self._lock:
            stream, timer = self._stream, self._timer
        if stream is not None:
            stream.close()
        if timer is not None:
            timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        low, high = self.backoff_s
        delay = low
        while not self.stop_event.is_set():
            opened = time.monotonic()
            saw_any = self._watch_once()
            # A stream that worked (an event came, or it lived a while) is retried soon.
            delay = low if saw_any or time.monotonic() - opened > high else min(delay * 2, high)
            self.stop_event.wait(delay)

    def _watch_once(self) -> bool:
        """Open the stream and read it until it ends or breaks; whether any event came."""
        saw_any = False
        engine: Engine | None = None
        stream: EventStream | None = None
        try:
            engine = self.engine_factory()
            stream = engine.events(self.project)
            with self._lock:
                self._stream = stream
            self.connections += 1
            if self.stop_event.is_set():
                return saw_any
            for event in stream:
                saw_any = True
                self._saw(event)
            if not self.stop_event.is_set():
                log.warning("engine event stream ended; reopening it")
        except EngineError as exc:
            if not self.stop_event.is_set():
                log.warning("engine event stream unavailable; retrying", error=str(exc))
        except Exception as exc:  # a bug must not end the watching for good: retried
            log.error("event watcher crashed; retrying", error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._stream = None
            if stream is not None:
                stream.close()
            if engine is not None:
                with contextlib.suppress(EngineError):
                    engine.close()
        return saw_any

    def _saw(self, event: EngineEvent) -> None:
        log.info("container event", action=event.action, container=event.name or event.container[:12])
        if self.busy():
            self.on_drift()  # a pass is running: one more follows it (coalesced)
            return
        with self._lock:
            if self._timer is not None:
                return  # part of a burst already waiting
            self._burst_at = time.monotonic()
            self._timer = threading.Timer(self.debounce_s, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
            covered = self.last_pass_began() > self._burst_at  # e.g. the pass a trigger asked for
        if not self.stop_event.is_set() and not covered:
            self.on_drift()
