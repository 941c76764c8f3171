"""The agent daemon (``agent run``): pull, reconcile, report, forever.

Root tasks, one shutdown rule (SIGTERM/SIGINT set the stop event; everything winds down from
there):

- the reconcile job (APScheduler): every ``interval`` seconds plus a random splay, one pass at a
  time, coalesced; ``agent trigger`` (or SIGHUP) asks for a pass now;
- the heartbeat job: feeds the systemd watchdog, unless a pass has run past ``pass_timeout``
  (then systemd restarts a hung agent);
- the control API (``agent.daemon.control``) on the owner-only socket;
- the event watcher (``agent.daemon.watch``): a container of ours that dies or is removed
  asks for a pass at once, not at the next interval.

A pass asks the desired-state source (a port: git remote, directory, or a fake) for the commit
to reconcile, and reconciles it (``agent.node.reconcile``). An unreachable remote keeps the
host on its last good commit (still healing drift) and is reported; a bad commit is reported
with its ``file:line`` and not applied. The engine and the source are injected, so all of this
runs in fast tests against ``agent.testing`` fakes.
"""

from __future__ import annotations

import os
import re
import secrets as pysecrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agent.adapters.fleetclient import HttpxDrains
from agent.adapters.fs import locked, private_dir
from agent.adapters.systemd import Notifier
from agent.core.errors import AgentError, EngineError
from agent.core.outcomes import Failure
from agent.core.ports import Clock, DesiredSource, Engine, SystemClock
from agent.core.redact import Redactor
from agent.core.rendered import project_name
from agent.daemon.control import ControlServer
from agent.daemon.gateway import GatewayDuty
from agent.daemon.metrics import Metrics
from agent.daemon.node import NodeDuty
from agent.daemon.watch import EventWatcher, Timing
from agent.desired.load import load_desired
from agent.node.drain import DrainHooks, DrainState, DrainTarget, FleetDrain
from agent.node.reconcile import PassOptions, PassResult, reconcile_once
from agent.node.settings import Settings
from agent.node.state import AgentState, Pause, StateStore, now

log = structlog.get_logger("agent.daemon")
#: A full commit id: SHA-1 (40 hex) or SHA-256 (64 hex) repositories.
SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")

EngineFactory = Callable[[], Engine]


def default_source(settings: Settings) -> DesiredSource:
    """A git remote when ``repo`` names one, else the directory read as it is."""
    from agent.adapters.gitsource import GitSource
    from agent.adapters.sources import DirectorySource, GitDesiredSource

    if not GitSource.is_git_url(settings.repo):
        return DirectorySource(Path(settings.repo))
    git = GitSource(
        settings.repo,
        settings.branch,
        settings.state_dir / "git",
        subdir=settings.repo_subdir,
        require_signed=settings.require_signed_commits,
        allowed_signers=settings.allowed_signers,
        gpg_home=settings.gpg_home,
    )
    return GitDesiredSource(git)


def docker_engine() -> Engine:
    from agent.adapters.engine import DockerEngine

    return DockerEngine()


@dataclass(frozen=True)
class Duties:
    """Makers of the fleet duties by role kind; ``None``: that duty is off."""

    gateway: Callable[[Settings, Redactor, Callable[[], object]], GatewayDuty] | None = GatewayDuty
    node: Callable[[Settings, Redactor], NodeDuty] | None = NodeDuty


#: No fleet duty at all (the daemon's own rules under test).
NO_DUTIES = Duties(gateway=None, node=None)


class Daemon:
    #: a burst of container events within this many seconds asks for one pass
    event_debounce_s = 0.5
    #: reopening a broken event stream: first wait, longest wait (doubling in between)
    event_backoff_s = (1.0, 30.0)

    def __init__(
        self,
        settings: Settings,
        redactor: Redactor | None = None,
        notifier: Notifier | None = None,
        *,
        engine_factory: EngineFactory = docker_engine,
        source: DesiredSource | None = None,
        clock: Clock | None = None,
        duties: Duties | None = None,
    ) -> None:
        self.settings = settings
        #: how the fleet duties are made (``None`` in a test: no fleet API, probes nor reports)
        self.duties = Duties() if duties is None else duties
        self.store = StateStore(settings.state_dir)
        self.redactor = redactor or Redactor()
        self.notifier = notifier or Notifier()
        self.engine_factory = engine_factory
        self.clock = clock or SystemClock()
        self.stop_event = threading.Event()
        self._pass_lock = threading.Lock()
        self._again = threading.Event()
        self._pass_started: float | None = None
        #: time.monotonic() when the latest pass began (the event watcher reads it)
        self._pass_began = 0.0
        self._engine: Engine | None = None
        self.source: DesiredSource = source or default_source(settings)
        self.last: PassResult | None = None
        self.services: dict[str, Any] = {}  # as last observed (a failed pass may observe nothing)
        self.source_error: str | None = None
        self.desired_commit: str | None = None
        self.prom = Metrics(paused=lambda: self.store.load().paused is not None)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        #: fleet duties by the kind of this host's role: the gateway's fleet API and routing
        #: loop, or a backend's health reports (started after the first good pass)
        self.gateway: GatewayDuty | None = None
        self.node: NodeDuty | None = None
        #: a backend host's drain (``agent.node.drain``): where it stands, for ``agent status``
        self.drain_state = DrainState()
        self._drain_api: HttpxDrains | None = None
        self._kind: tuple[str, str] | None = None  # (commit, kind of this host's role)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        private_dir(self.settings.state_dir)
        with locked(self.settings.state_dir / "agent.lock", "another agent is already running", write_pid=True):
            server = ControlServer(self.settings.socket_path, self)
            server.start()
            self._schedule()
            watcher = self.start_watching()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop_event.set())
            signal.signal(signal.SIGHUP, lambda *_: self.trigger())
            self.notifier.ready(f"watching {self.source.description} for host {self.settings.host}")
            log.info("agent started", host=self.settings.host, repo=self.source.description, pid=os.getpid())
            try:
                while not self.stop_event.wait(1.0):
                    pass
            finally:
                log.info("agent stopping")
                self.notifier.stopping()
                watcher.close()
                self.scheduler.shutdown(wait=True)
                server.close()
                self.close()
        return 0

    def close(self) -> None:
        """Stop the fleet duties and drop the engine connection (the end of ``run``)."""
        for duty in (self.gateway, self.node):
            if duty is not None:
                duty.close()
        self.gateway = self.node = None
        self._drop_engine()

    def start_watching(self) -> EventWatcher:
        """Watch the engine's events for this host's containers (see ``agent.daemon.watch``)."""
        return EventWatcher(
            self.engine_factory,
            project_name(self.settings.host, self.settings.project_prefix),
            self.trigger,
            self.stop_event,
            busy=self._pass_lock.locked,
            last_pass_began=lambda: self._pass_began,
            timing=Timing(self.event_debounce_s, self.event_backoff_s),
        ).start()

    def _schedule(self) -> None:
        self.scheduler.add_job(
            self.reconcile_job,
            IntervalTrigger(seconds=self.settings.interval, jitter=self.settings.splay),
            id="reconcile",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        beat = self.notifier.watchdog_interval_s or 5.0
        self.scheduler.add_job(
            self.heartbeat, IntervalTrigger(seconds=beat), id="heartbeat", max_instances=1, coalesce=True
        )
        self.scheduler.start()

    def heartbeat(self) -> None:
        started = self._pass_started
        if started is not None and self.clock.monotonic() - started > self.settings.pass_timeout:
            seconds = round(self.clock.monotonic() - started)
            log.error("pass running too long; not feeding the watchdog", seconds=seconds)
            return
        self.notifier.watchdog()

    # ------------------------------------------------------------------ passes

    def reconcile_job(self) -> None:
        """One pass, and one more for every burst of triggers that arrived during it."""
        while True:
            if not self._pass_lock.acquire(blocking=False):
                self._again.set()  # a pass is running: it runs once more right after
                return
            try:
                self._again.clear()
                self._pass_began = time.monotonic()
                self.one_pass()
            finally:
                self._pass_lock.release()
            # A trigger that arrived during the pass (even just as it ended) gets its pass.
            if not self._again.is_set() or self.stop_event.is_set():
                return

    def one_pass(self) -> PassResult | None:
        run_id = pysecrets.token_hex(4)
        structlog.contextvars.bind_contextvars(run_id=run_id)
        self._pass_started = self.clock.monotonic()
        try:
            return self._one_pass(run_id)
        except Exception as exc:  # a bug must not kill the scheduler: record it, redacted
            log.error("pass crashed", error=self.redactor.scrub(f"{type(exc).__name__}: {exc}"))
            return self._failed(run_id, Failure.INTERNAL, f"internal error: {exc!r}")
        finally:
            self._pass_started = None
            structlog.contextvars.unbind_contextvars("run_id")

    def _failed(self, run_id: str, failure: Failure, error: str, commit: str = "") -> PassResult:
        """A pass that ended before reconciling (no source, no engine, a bug)."""
        result = PassResult(host=self.settings.host, commit=commit, run_id=run_id)
        result.fail(failure, self.redactor.scrub(error))
        result.started = result.finished = now()
        self.last = result
        self.prom.count(result.result)
        return result

    def _one_pass(self, run_id: str) -> PassResult | None:
        state = self.store.load()
        if state.paused is not None:
            self.notifier.status(f"paused: {state.paused.reason}")
            log.info("paused; not applying", reason=state.paused.reason)
            return None
        last_good = state.applied_commit if state.applied_commit and SHA.fullmatch(state.applied_commit) else None
        try:
            checkout = self.source.current(last_good)
        except AgentError as exc:
            self.source_error = self.redactor.scrub(str(exc))
            log.error("desired state unavailable", error=self.source_error)
            self.notifier.status(f"source error: {self.source_error}")
            return self._failed(run_id, Failure.SOURCE, self.source_error)
        self.source_error = checkout.problem
        self.desired_commit = checkout.commit
        if checkout.problem:
            log.warning("staying on the last good commit", error=checkout.problem, commit=checkout.commit)
        engine = self._connect()
        if isinstance(engine, PassResult):
            engine.run_id = run_id
            return engine
        self._gateway_early(checkout.path, checkout.commit)
        started = self.clock.monotonic()
        result = self._reconcile(engine, checkout.path, checkout.commit, run_id, record=True)
        if result.error and result.changed() == 0 and last_good and last_good != checkout.commit:
            self._heal_last_good(engine, last_good)
        if result.changed():
            drift = result.changed() if checkout.commit == last_good else 0
            self.prom.changed(self.clock.monotonic() - started, drift)
        if result.failure is Failure.ENGINE_UNAVAILABLE:
            self._drop_engine()
        self._report(result)
        if result.error is None:
            self._fleet_duties(checkout.path, checkout.commit, result, engine)
        elif self.node is not None:
            try:
                self.node.pass_failed(result)
            except (AgentError, OSError) as exc:
                log.error("fleet duty failed", error=self.redactor.scrub(str(exc)))
        if result.follow_up and result.error is None:
            log.info("another pass follows", reason=result.follow_up)
            self._again.set()  # reconcile_job runs it right after this one
        return result

    def _fleet_duties(self, path: Path, commit: str, result: PassResult, engine: Engine) -> None:
        """After a good pass: the gateway's or the backend's fleet duty, by the role's kind."""
        try:
            kind = self._host_kind(path, commit)
            if kind == "gateway" and self.duties.gateway is not None:
                self.gateway = self.gateway or self.duties.gateway(self.settings, self.redactor, self.trigger)
                self.gateway.after_pass(path, commit, result, engine)
            elif kind == "backend" and self.duties.node is not None:
                self.node = self.node or self.duties.node(self.settings, self.redactor)
                self.node.after_pass(path, commit, result, engine)
        except (AgentError, OSError) as exc:
            log.error("fleet duty failed", error=self.redactor.scrub(str(exc)))

    def _gateway_early(self, path: Path, commit: str) -> None:
        """On the gateway's first pass, its fleet duty (the fleet API, the routing loop) starts
        before the stack does, not after: the first pass waits for the proxy to be healthy
        (half a minute on two cores), and the nodes' reports are taken meanwhile. A desired
        state that does not load is the pass's to report."""
        if self.gateway is not None or self.duties.gateway is None:
            return
        try:
            if self._host_kind(path, commit) != "gateway":
                return
            self.gateway = self.duties.gateway(self.settings, self.redactor, self.trigger)
            self.gateway.prepare(path, commit)
        except (AgentError, OSError) as exc:
            log.debug("fleet duty not started before the pass", error=self.redactor.scrub(str(exc)))

    def _host_kind(self, path: Path, commit: str) -> str:
        if self._kind is None or self._kind[0] != commit:
            self._kind = (commit, load_desired(path).host(self.settings.host).kind)
        return self._kind[1]

    def _connect(self) -> Engine | PassResult:
        if self._engine is None:
            try:
                self._engine = self.engine_factory()
            except EngineError as exc:
                log.error("docker engine unavailable", error=str(exc))
                return self._failed("", Failure.ENGINE_UNAVAILABLE, str(exc), self.desired_commit or "")
        return self._engine

    def _drop_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def _reconcile(self, engine: Engine, path: Path, commit: str, run_id: str | None, record: bool) -> PassResult:
        options = PassOptions(
            health_cap_s=self.settings.health_timeout,
            say=log.info,
            on_secret=self.redactor.add,
            run_id=run_id,
            stopping=self.stop_event.is_set,
            record=record,
            health=self.gateway.health() if self.gateway is not None else None,
            drain=self._drain if self.duties.node is not None else None,
        )
        result = reconcile_once(self.settings, engine, repo=path, commit=commit, options=options, clock=self.clock)
        if result.error:
            result.error = self.redactor.scrub(result.error)
        return result

    def _drain(self, target: DrainTarget) -> FleetDrain:
        """How this pass drains the host's backend before replacing it (a backend host only)."""
        if self._drain_api is None:
            self._drain_api = HttpxDrains()
        hooks = DrainHooks(say=log.info, stopping=self.stop_event.is_set, on_stage=self._drain_stage)
        return FleetDrain(target, self._drain_api, hooks=hooks, clock=self.clock, state=self.drain_state)

    def _drain_stage(self, draining: bool) -> None:
        """The backend's stage, reported at once: ``draining``, then what it is after."""
        if self.node is None:
            return
        try:
            self.node.refresh(draining=draining)
        except Exception as exc:  # a report is best effort; the drain goes on
            log.warning("stage not reported", error=f"{type(exc).__name__}: {exc}")

    def _report(self, result: PassResult) -> None:
        self.last = result
        if result.services:
            self.services = result.services
        self.prom.count(result.result)
        short = result.commit[:12]
        if result.error:
            log.error("pass failed", commit=short, error=result.error, failure=result.failure)
            self.notifier.status(f"failed at {short}: {result.error.splitlines()[0][:200]}")
        else:
            log.info("pass done", commit=short, result=result.result, changes=result.changed())
            self.notifier.status(f"converged at {short}" + (f" ({self.source_error})" if self.source_error else ""))

    def _heal_last_good(self, engine: Engine, last_good: str) -> None:
        """The branch head cannot be applied (bad or quarantined commit): keep the host as the
        last good commit says (a removed or stopped container comes back). Not recorded as a
        run: status keeps showing why the head is not applied."""
        try:
            path = self.source.snapshot_of(last_good)
            if path is None:
                return
            healed = self._reconcile(engine, path, last_good, None, record=False)
        except AgentError as exc:
            log.warning("could not heal on the last good commit", error=self.redactor.scrub(str(exc)))
            return
        if healed.changed():
            self.prom.changed(0.0, healed.changed())
            log.info("drift healed on the last good commit", commit=last_good[:12], changes=healed.changed())

    # ------------------------------------------------------------------ control API

    def trigger(self) -> dict[str, Any]:
        if self._pass_lock.locked():
            self._again.set()
            return {"triggered": True, "note": "a pass is running; another follows it"}
        self.scheduler.add_job(self.reconcile_job, id="trigger", replace_existing=True, max_instances=1)
        return {"triggered": True}

    def pause(self, reason: str) -> dict[str, Any]:
        set_pause(self.store, reason)
        log.info("paused", reason=reason)
        return {"paused": True, "reason": reason}

    def resume(self) -> dict[str, Any]:
        set_pause(self.store, None)
        log.info("resumed")
        self.trigger()
        return {"paused": False}

    def status(self) -> dict[str, Any]:
        out = status_from_state(self.settings, self.store.load())
        out.update(running=True, pid=os.getpid(), source={"repo": self.source.description, "error": self.source_error})
        out["desired_commit"] = self.desired_commit
        if self.last is not None:
            out["last_run"] = {
                **run_summary(self.last),
                "actions": [a.as_dict() for a in self.last.actions if a.kind != "noop"],
            }
            out["role"] = self.last.role or out.get("role")
            out["services"] = service_list(self.services)
            if self.last.routing:
                out["routing"] = self.last.routing
                out["fleet"] = {}
        if self.gateway is not None:
            out.update(self.gateway.status())
        if self.node is not None:
            out["backend"] = self.node.status()
        d = self.drain_state
        if d.stage != "idle" or d.since:
            out.setdefault("backend", {})["drain"] = {"stage": d.stage, "detail": d.detail, "since": d.since}
        return out

    def metrics(self) -> str:
        return self.prom.text()


def run_summary(result: PassResult) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "time": result.finished,
        "result": result.result,
        "failure": result.failure,
        "commit": result.commit,
        "error": result.error,
    }


def service_list(services: dict[str, Any]) -> list[dict[str, Any]]:
    """The contract's form: one entry per service with its name, container id, state, health."""
    return [
        {"name": name, **{k: v for k, v in info.items() if k != "container_name"}}
        for name, info in sorted(services.items())
    ]


def set_pause(store: StateStore, reason: str | None) -> None:
    """Pause (with a reason) or resume; persisted, so it holds across restarts."""

    def change(state: AgentState) -> None:
        state.paused = Pause(reason=reason, at=now()) if reason else None

    store.update(change)


def status_from_state(settings: Settings, state: AgentState) -> dict[str, Any]:
    """What can be said from the state file alone (also when the daemon is not running)."""
    last = state.runs[-1] if state.runs else None
    return {
        "host": state.host or settings.host,
        "role": state.role,
        "running": False,
        "applied_commit": state.applied_commit,
        "last_run": (
            {
                "run_id": last.id,
                "time": last.finished,
                "result": last.result,
                "failure": last.failure,
                "commit": last.commit,
                "error": last.error,
            }
            if last
            else None
        ),
        "paused": {"reason": state.paused.reason, "at": state.paused.at} if state.paused else None,
        "quarantined": {fp: q.model_dump() for fp, q in state.quarantine.items()},
        "services": service_list(state.services),
        "state_reset": state.reset.describe() if state.reset else None,
    }
