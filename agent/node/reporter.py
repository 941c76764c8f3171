"""Reports a host's state to the motoko agent, from a background thread that never blocks the
reconcile pass.

The pass calls ``update(fields)`` with what it saw and ``changed()`` when something a gateway
cares about changed; both return at once (a lock held for an assignment). The reporter thread:

- sends the newest fields every ``interval_s``, and soon after ``changed()`` (debounced by
  ``debounce_s``: a burst of changes is one report);
- stamps each attempt with this run's ``boot_id`` (random, drawn per process), the next
  ``seq`` and a fresh ``sent_at``, so a retry is never refused as a replay or as stale;
- keeps only the newest fields while motoko is unreachable (one slot, never a queue: a report
  is state, not an event) and retries with exponential backoff and jitter up to
  ``max_backoff_s``;
- logs a refused report (4xx: wrong token, clock off...) with motoko's reason, once per
  reason, and waits at least ``interval_s`` before the next try: resending sooner cannot help.

``stop()`` wakes the thread and returns within ``join_s``; an attempt in flight ends within
the sender's own timeout (the thread is a daemon).
"""

from __future__ import annotations

import random
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog
from pydantic import ValidationError

from agent import __version__
from agent.adapters.fleetclient import HttpxSender, Sent
from agent.core.gpu import GpuFacts
from agent.core.health import BackendHealth, Stage, stage_of
from agent.core.ports import Clock, SystemClock
from agent.core.report import NodeReport

log = structlog.get_logger("agent.reporter")


class Sender(Protocol):
    def __call__(self, url: str, token: str, body: bytes) -> Sent: ...


@dataclass(frozen=True)
class ReportFields:
    """What the host observed, before a run's stamps (``boot_id``, ``seq``, ``sent_at``)."""

    role: str
    stage: Stage = Stage.UNKNOWN
    commit: str | None = None
    health: BackendHealth | None = None
    gpu: GpuFacts | None = None
    services: Mapping[str, str] = field(default_factory=dict)
    problem: str | None = None


def judged(
    fields: ReportFields, container_state: str | None, log_tail: str, *, pulling: bool = False, draining: bool = False
) -> ReportFields:
    """``fields`` with the backend's stage judged by ``stage_of`` from its container, its last
    log lines and the probe (``fields.health``)."""
    stage = stage_of(container_state, log_tail, fields.health, pulling=pulling, draining=draining)
    return replace(fields, stage=stage)


def build_report(
    host: str, fields: ReportFields, *, boot_id: str, seq: int, sent_at: float, agent_version: str = __version__
) -> NodeReport:
    """The report as motoko takes it (``agent.core.report.NodeReport``); raises
    ``pydantic.ValidationError`` for fields it would refuse."""
    return NodeReport(
        host=host,
        role=fields.role,
        commit=fields.commit,
        stage=fields.stage,
        health=fields.health,
        gpu=fields.gpu,
        services=dict(fields.services),
        problem=fields.problem,
        boot_id=boot_id,
        seq=seq,
        sent_at=sent_at,
        agent_version=agent_version,
    )


def new_boot_id() -> str:
    return secrets.token_hex(16)


@dataclass
class _Schedule:
    """When the next attempt is due (monotonic seconds), and the failures behind it."""

    due: float
    failures: int = 0
    last_problem: str = ""


class Reporter:
    def __init__(  # noqa: PLR0913  (the knobs a daemon and the tests set)
        self,
        url: str,
        host: str,
        token: str,
        interval_s: float = 10.0,
        clock: Clock | None = None,
        send: Sender | None = None,
        *,
        debounce_s: float = 0.2,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = 5.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.host = host
        self.interval_s = interval_s
        self.debounce_s = debounce_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock or SystemClock()
        self.rng = rng
        self.boot_id = new_boot_id()
        self.seq = 0
        #: Attempts made and reports delivered (for ``agent status`` and the tests).
        self.attempts = 0
        self.delivered = 0
        self.last_result: Sent | None = None
        self._own_sender = send is None
        self._send: Sender = send or HttpxSender(timeout_s)
        self._url, self._token = url, token
        self._fields: ReportFields | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._schedule = _Schedule(due=self.clock.monotonic())
        self._thread = threading.Thread(target=self._run, name="reporter", daemon=True)

    # ------------------------------------------------------------------ the caller's side: never blocks

    def start(self) -> None:
        self._thread.start()

    def update(self, fields: ReportFields) -> None:
        """The newest state; replaces whatever was not sent yet."""
        with self._lock:
            if self._fields is None and self._schedule.failures == 0:  # the first: report it soon
                self._schedule.due = min(self._schedule.due, self.clock.monotonic() + self.debounce_s)
            self._fields = fields
        self._wake.set()

    def changed(self) -> None:
        """Report soon (after ``debounce_s``), unless a backoff is running."""
        with self._lock:
            if self._schedule.failures == 0:
                self._schedule.due = min(self._schedule.due, self.clock.monotonic() + self.debounce_s)
        self._wake.set()

    def set_url(self, url: str) -> None:
        with self._lock:
            self._url = url

    def set_token(self, token: str) -> None:
        """A rotated token: the next attempt uses it, at once."""
        with self._lock:
            self._token = token
            self._schedule.due = self.clock.monotonic()
        self._wake.set()

    def stop(self, join_s: float = 1.0) -> bool:
        """End the thread; True if it ended within ``join_s``."""
        self._stopped.set()
        self._wake.set()
        if self._thread.ident is None and self._own_sender and isinstance(self._send, HttpxSender):
            self._send.close()  # never started: the thread will not close it
        if self._thread.is_alive():
            self._thread.join(join_s)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                wait = self._until_due()
                if wait > 0:
                    self._wake.wait(wait)
                    self._wake.clear()
                    continue
                self._attempt()
        finally:
            if self._own_sender and isinstance(self._send, HttpxSender):
                self._send.close()

    def _until_due(self) -> float:
        with self._lock:
            if self._fields is None:
                self._schedule.due = self.clock.monotonic() + self.interval_s
            return self._schedule.due - self.clock.monotonic()

    def _attempt(self) -> None:
        with self._lock:
            fields, url, token = self._fields, self._url, self._token
            if fields is None:
                return
            self.seq += 1
            seq = self.seq
        self.attempts += 1
        try:
            body = build_report(
                self.host, fields, boot_id=self.boot_id, seq=seq, sent_at=self.clock.time()
            ).model_dump_json()
            result = self._send(url, token, body.encode())
        except ValidationError as exc:
            result = Sent(0, _invalid(exc))
        except Exception as exc:  # a sender that breaks its contract must not end reporting
            result = Sent(None, f"{type(exc).__name__}: {exc}")
        self.last_result = result
        self._after(result)

    def _after(self, result: Sent) -> None:
        now = self.clock.monotonic()
        with self._lock:
            s = self._schedule
            if result.delivered:
                if s.failures:
                    log.info("reports delivered again", url=self._url, after_failures=s.failures)
                self.delivered += 1
                s.failures, s.last_problem, s.due = 0, "", now + self.interval_s
                return
            s.failures += 1
            delay = self._backoff(s.failures)
            if result.status is not None and not 500 <= result.status < 600:
                delay = max(delay, self.interval_s)  # refused (or invalid here): resending sooner cannot help
            s.due = now + delay
            problem, repeated = result.detail, result.detail == s.last_problem
            s.last_problem = problem
        self._log_failure(result, problem, delay, repeated)

    def _backoff(self, failures: int) -> float:
        """Exponential, capped, with jitter (half to all of it): hosts do not retry in step."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2.0 ** min(failures - 1, 32))
        return ceiling * (0.5 + 0.5 * self.rng())

    def _log_failure(self, result: Sent, problem: str, delay: float, repeated: bool) -> None:
        level = log.debug if repeated else log.warning
        status = result.status
        event = "motoko unreachable" if status is None else "report failed" if status >= 500 else "report refused"
        level(event, url=self._url, reason=problem, retry_in_s=round(delay, 2))


def _invalid(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "report"
    return f"not a valid report: {where}: {first['msg']}"
