"""The agent daemon (``agent run``): pull, reconcile, report, forever.

Root tasks, one shutdown rule (SIGTERM/SIGINT set the stop event; everything winds down from
there):

- the reconcile job (APScheduler): every ``interval`` seconds plus a random splay, one pass at a
  time, coalesced; ``agent trigger`` (or SIGHUP) asks for a pass now;
- the heartbeat job: feeds the systemd watchdog, unless a pass has run past ``pass_timeout``
  (then systemd restarts a hung agent);
- the control API (``agent.control``) on the owner-only socket.

A pass fetches the desired-state repository (a force-push is followed), takes a snapshot of
the exact commit, and reconciles it (``agent.reconcile``). An unreachable remote keeps the host
on its last good commit (still healing drift) and is reported; a bad commit is reported with
its ``file:line`` and not applied.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets as pysecrets
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from agent.adapters.engine import Engine, EngineError
from agent.adapters.systemd import Notifier
from agent.core.errors import AgentError
from agent.core.plan import MUTATING
from agent.daemon.control import ControlServer
from agent.daemon.logs import Redactor
from agent.node.reconcile import PassResult, reconcile_once, repo_commit
from agent.node.settings import Settings
from agent.node.state import AgentState, Pause, StateStore, now

log = structlog.get_logger("agent.daemon")
SHA = re.compile(r"[0-9a-f]{40}")


class Source(Protocol):
    """Where the desired state comes from: ``(commit, directory)`` for this pass."""

    description: str

    def current(self, last_good: str | None) -> tuple[str, Path, str | None]: ...

    def snapshot_of(self, commit: str) -> Path | None: ...


class DirectorySource:
    """A plain directory, read as it is (local runs, the shipped example)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)

    def current(self, last_good: str | None) -> tuple[str, Path, str | None]:
        return repo_commit(self.path), self.path, None

    def snapshot_of(self, commit: str) -> Path | None:
        return None  # a directory changes in place: there is no older version to go back to


class GitDesiredSource:
    """A git remote: forced fetch of the branch, snapshot of the exact commit."""

    def __init__(self, settings: Settings) -> None:
        from agent.adapters.gitsource import GitSource, redact

        self.git = GitSource(
            settings.repo,
            settings.branch,
            settings.state_dir / "git",
            subdir=settings.repo_subdir,
            require_signed=settings.require_signed_commits,
            allowed_signers=settings.allowed_signers,
            gpg_home=settings.gpg_home,
        )
        self.description = f"{redact(settings.repo)}#{settings.branch}"

    def snapshot_of(self, commit: str) -> Path | None:
        return self.git.snapshot(commit).path

    def current(self, last_good: str | None) -> tuple[str, Path, str | None]:
        """The commit to reconcile, its snapshot, and a source problem to report (if any)."""
        from agent.adapters.gitsource import SourceError

        try:
            sha = self.git.fetch()
        except SourceError as exc:
            if last_good is None:
                raise
            # The remote is unreachable: stay on (and keep healing) the last good commit.
            return last_good, self.git.snapshot(last_good).path, str(exc)
        try:
            snap = self.git.snapshot(sha)
        except SourceError as exc:  # an unsigned head, or one that cannot be exported
            if last_good is None or last_good == sha:
                raise
            # Refused: stay on (and keep healing) the last good commit; report why.
            return last_good, self.git.snapshot(last_good).path, f"commit {sha[:12]} refused: {exc}"
        if last_good:
            self.git.prune({sha, last_good})
        return sha, snap.path, None


class Daemon:
    def __init__(self, settings: Settings, redactor: Redactor | None = None, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.store = StateStore(settings.state_dir)
        self.redactor = redactor or Redactor()
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self._pass_lock = threading.Lock()
        self._again = threading.Event()
        self._pass_started: float | None = None
        self._engine: Engine | None = None
        self.source: Source = (
            GitDesiredSource(settings) if _is_git(settings.repo) else DirectorySource(Path(settings.repo))
        )
        self.last: PassResult | None = None
        self.services: dict[str, Any] = {}  # as last observed (a failed pass may observe nothing)
        self.source_error: str | None = None
        self.desired_commit: str | None = None
        self.metrics_data: dict[str, float] = {
            "runs_converged": 0,
            "runs_failed": 0,
            "last_success": 0.0,
            "drift_corrections": 0,
            "apply_seconds_sum": 0.0,
            "apply_seconds_count": 0,
        }
        self.scheduler = BackgroundScheduler(timezone=UTC)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        with instance_lock(self.settings.state_dir):
            server = ControlServer(self.settings.socket_path, self)
            server.start()
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
                self.scheduler.shutdown(wait=True)
                server.close()
                if self._engine is not None:
                    self._engine.close()
        return 0

    def heartbeat(self) -> None:
        started = self._pass_started
        if started is not None and time.monotonic() - started > self.settings.pass_timeout:
            log.error("pass running too long; not feeding the watchdog", seconds=round(time.monotonic() - started))
            return
        self.notifier.watchdog()

    # ------------------------------------------------------------------ passes

    def reconcile_job(self) -> None:
        while True:
            if not self._pass_lock.acquire(blocking=False):
                self._again.set()  # a pass is running: it runs once more right after
                return
            try:
                self._again.clear()
                self.one_pass()
            finally:
                self._pass_lock.release()
            # A trigger that arrived during the pass (even just as it ended) gets its pass.
            if not self._again.is_set() or self.stop_event.is_set():
                return

    def one_pass(self) -> PassResult | None:
        run_id = pysecrets.token_hex(4)
        structlog.contextvars.bind_contextvars(run_id=run_id)
        self._pass_started = time.monotonic()
        try:
            return self._one_pass(run_id)
        except Exception as exc:  # a bug must not kill the scheduler: record it, redacted
            log.exception("pass crashed")
            self.last = PassResult(
                host=self.settings.host, error=self.redactor.scrub(f"internal error: {exc!r}"), run_id=run_id
            )
            self.last.started = self.last.finished = now()
            self._count(self.last)
            return self.last
        finally:
            self._pass_started = None
            structlog.contextvars.unbind_contextvars("run_id")

    def _one_pass(self, run_id: str) -> PassResult | None:
        state = self.store.load()
        if state.paused is not None:
            self.notifier.status(f"paused: {state.paused.reason}")
            log.info("paused; not applying", reason=state.paused.reason)
            return None
        last_good = state.applied_commit if state.applied_commit and SHA.fullmatch(state.applied_commit) else None
        try:
            commit, path, self.source_error = self.source.current(last_good)
        except AgentError as exc:
            self.source_error = self.redactor.scrub(str(exc))
            self.last = PassResult(host=self.settings.host, error=self.source_error, run_id=run_id)
            self.last.started = self.last.finished = now()
            self._count(self.last)
            log.error("desired state unavailable", error=self.source_error)
            self.notifier.status(f"source error: {self.source_error}")
            return self.last
        self.desired_commit = commit
        if self.source_error:
            log.warning("remote unreachable; staying on the last good commit", error=self.source_error, commit=commit)
        try:
            engine = self._engine or Engine()
            self._engine = engine
        except EngineError as exc:
            self.last = PassResult(host=self.settings.host, commit=commit, error=str(exc), run_id=run_id)
            self._count(self.last)
            log.error("docker engine unavailable", error=str(exc))
            return self.last
        t0 = time.monotonic()
        result = reconcile_once(
            self.settings,
            engine,
            repo=path,
            commit=commit,
            health_cap_s=self.settings.health_timeout,
            say=log.info,
            on_secret=self.redactor.add,
            run_id=run_id,
            stopping=self.stop_event.is_set,
        )
        if result.error:
            result.error = self.redactor.scrub(result.error)
            changed_nothing = result.applied is None or not any(
                o.ok and o.action.kind in MUTATING for o in result.applied.outcomes
            )
            if changed_nothing and last_good and last_good != commit:
                self._heal_last_good(last_good)
        done = [o for o in (result.applied.outcomes if result.applied else []) if o.ok and o.action.kind in MUTATING]
        if done:
            elapsed = time.monotonic() - t0
            self.metrics_data["apply_seconds_sum"] += elapsed
            self.metrics_data["apply_seconds_count"] += 1
            if commit == last_good:
                self.metrics_data["drift_corrections"] += len(done)
        if result.error and "not reachable" in result.error:
            engine.close()
            self._engine = None
        self.last = result
        if result.services:
            self.services = result.services
        self._count(result)
        short = commit[:12]
        if result.error:
            log.error("pass failed", commit=short, error=result.error)
            self.notifier.status(f"failed at {short}: {result.error.splitlines()[0][:200]}")
        else:
            log.info("pass done", commit=short, result=result.result, changes=len(done))
            self.notifier.status(f"converged at {short}" + (" (remote unreachable)" if self.source_error else ""))
        return result

    def _heal_last_good(self, last_good: str) -> None:
        """The branch head cannot be applied (bad or quarantined commit): keep the host as the
        last good commit says (a removed or stopped container comes back). Not recorded as a
        run: status keeps showing why the head is not applied."""
        try:
            path = self.source.snapshot_of(last_good)
            if path is None or self._engine is None:
                return
            healed = reconcile_once(
                self.settings,
                self._engine,
                repo=path,
                commit=last_good,
                health_cap_s=self.settings.health_timeout,
                say=log.info,
                on_secret=self.redactor.add,
                stopping=self.stop_event.is_set,
                record=False,
            )
        except AgentError as exc:
            log.warning("could not heal on the last good commit", error=self.redactor.scrub(str(exc)))
            return
        fixed = [o for o in (healed.applied.outcomes if healed.applied else []) if o.ok and o.action.kind in MUTATING]
        if fixed:
            self.metrics_data["drift_corrections"] += len(fixed)
            log.info("drift healed on the last good commit", commit=last_good[:12], changes=len(fixed))

    def _count(self, result: PassResult) -> None:
        if result.result == "converged":
            self.metrics_data["runs_converged"] += 1
            self.metrics_data["last_success"] = time.time()
        else:
            self.metrics_data["runs_failed"] += 1

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
        state = self.store.load()
        out = status_from_state(self.settings, state)
        out.update(running=True, pid=os.getpid(), source={"repo": self.source.description, "error": self.source_error})
        out["desired_commit"] = self.desired_commit
        if self.last is not None:
            out["last_run"] = {
                "run_id": self.last.run_id,
                "time": self.last.finished,
                "result": self.last.result,
                "commit": self.last.commit,
                "error": self.last.error,
                "actions": [a.as_dict() for a in self.last.actions if a.kind != "noop"],
            }
            out["role"] = self.last.role or out.get("role")
            out["services"] = service_list(self.services)
            if self.last.role == "motoko":
                out["routing"] = self.last.routing
                out["fleet"] = {}
        return out

    def metrics(self) -> str:
        m = self.metrics_data
        lines = [
            "# HELP llm_agent_runs_total Reconcile passes by result.",
            "# TYPE llm_agent_runs_total counter",
            f'llm_agent_runs_total{{result="converged"}} {m["runs_converged"]:.0f}',
            f'llm_agent_runs_total{{result="failed"}} {m["runs_failed"]:.0f}',
            "# HELP llm_agent_run_failures_total Reconcile passes that failed.",
            "# TYPE llm_agent_run_failures_total counter",
            f"llm_agent_run_failures_total {m['runs_failed']:.0f}",
            "# HELP llm_agent_last_success_timestamp_seconds When the last pass converged.",
            "# TYPE llm_agent_last_success_timestamp_seconds gauge",
            f"llm_agent_last_success_timestamp_seconds {m['last_success']:.3f}",
            "# HELP llm_agent_drift_corrections_total Changes made to undo drift (desired state unchanged).",
            "# TYPE llm_agent_drift_corrections_total counter",
            f"llm_agent_drift_corrections_total {m['drift_corrections']:.0f}",
            "# HELP llm_agent_apply_duration_seconds Time spent in passes that changed something.",
            "# TYPE llm_agent_apply_duration_seconds summary",
            f"llm_agent_apply_duration_seconds_sum {m['apply_seconds_sum']:.3f}",
            f"llm_agent_apply_duration_seconds_count {m['apply_seconds_count']:.0f}",
            "# HELP llm_agent_paused Whether applying is paused.",
            "# TYPE llm_agent_paused gauge",
            f"llm_agent_paused {1 if self.store.load().paused else 0}",
        ]
        return "\n".join(lines) + "\n"


def service_list(services: dict[str, Any]) -> list[dict[str, Any]]:
    """The contract's form: one entry per service with its name, container id, state, health."""
    return [{"name": name, **info} for name, info in sorted(services.items())]


def set_pause(store: StateStore, reason: str | None) -> None:
    """Pause (with a reason) or resume; persisted, so it holds across restarts."""

    def change(state: AgentState) -> None:
        state.paused = Pause(reason=reason, at=now()) if reason else None

    store.update(change)


def status_from_state(settings: Settings, state: AgentState) -> dict[str, Any]:
    """What can be said from the state file alone (also when the daemon is not running)."""
    last = state.runs[-1] if state.runs else None
    return {
        "host": settings.host,
        "role": state.role,
        "running": False,
        "applied_commit": state.applied_commit,
        "last_run": (
            {
                "run_id": last.id,
                "time": last.finished,
                "result": last.result,
                "commit": last.commit,
                "error": last.error,
            }
            if last
            else None
        ),
        "paused": {"reason": state.paused.reason, "at": state.paused.at} if state.paused else None,
        "quarantined": {fp: q.model_dump() for fp, q in state.quarantine.items()},
        "services": service_list(state.services),
    }


def _is_git(repo: str) -> bool:
    from agent.adapters.gitsource import GitSource

    return GitSource.is_git_url(repo)


@contextlib.contextmanager
def instance_lock(state_dir: Path) -> Any:
    """One daemon per host: an exclusive lock held for the process's life."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / "agent.lock"
    fh = open(path, "a+")  # noqa: SIM115 - held for the daemon's whole life
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            raise AgentError(f"another agent is already running on this host (pid {pid}; lock {path})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()
