"""Carries out a plan against the engine: files, networks, then containers, safely.

The only place that changes anything. Its phases, in order (``Executor.apply``):

1. ``_refuse_conflicts``: a container we do not own holds a name we need: nothing is done;
2. ``_images``: images are pulled before anything running is touched; an image that cannot
   be had fails the pass with nothing changed;
3. ``_prepare``: stack files are written atomically into the stack directory (and put back as
   they were if the pass fails), networks and volumes created;
4. ``_services``: services start in ``depends_on`` waves, independent ones in parallel (up to
   8 workers), each waiting for health within a deadline that honours its healthcheck's start
   period. A replacement creates the new container before the old one stops; where no host
   port is in the way, the new one is healthy before the old one goes. A new container that
   fails its deadline or exits is removed and the old one brought back;
5. ``_cleanup``: orphans and unused networks, once everything wanted is up.
"""

from __future__ import annotations

import contextvars
import json
import secrets as pysecrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.adapters.fs import write_atomic
from agent.core import labels as L
from agent.core.errors import EngineError, EngineUnavailable
from agent.core.hashing import canonical_json
from agent.core.observed import Observed
from agent.core.outcomes import MUTATING, ActionKind, Failure, HealthWait, WaitEnd
from agent.core.plan import Action, Desired, container_labels, container_name, desired_service, network_name
from agent.core.ports import Clock, Engine, SystemClock
from agent.core.stack import ServiceSpec, StackSpec
from agent.node.drain import DrainAborted, DrainNotGranted

log = structlog.get_logger("agent.executor")

MAX_WORKERS = 8
#: While waiting for a service to become healthy, say so this often (a model can take minutes).
WAIT_NOTE_S = 15.0
#: How often the container's state is polled while waiting.
POLL_S = 0.25
#: Actions the service workers carry out (removals of orphans are the cleanup's).
SERVICE_KINDS = frozenset(
    {ActionKind.CREATE, ActionKind.RECREATE, ActionKind.START, ActionKind.RELOAD, ActionKind.RESTART, ActionKind.NOOP}
)


@dataclass
class Outcome:
    action: Action
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        return {**self.action.as_dict(), "ok": self.ok, "detail": self.detail}


@dataclass
class ApplyResult:
    outcomes: list[Outcome] = field(default_factory=list)
    error: str | None = None
    #: a previous container was brought back
    rolled_back: bool = False
    #: a new version did not come up (worth quarantining that desired state)
    rollout_failed: bool = False
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(o.ok for o in self.outcomes)

    def changed(self) -> list[Outcome]:
        """Outcomes that changed something on the engine."""
        return [o for o in self.outcomes if o.ok and o.action.kind in MUTATING]

    def fail(self, action: Action, message: str, error: str | None = None, failure: Failure = Failure.ENGINE) -> None:
        self.outcomes.append(Outcome(action, False, message))
        if self.error is None:
            self.error, self.failure = error or message, failure

    def engine_failed(self, exc: EngineError, message: str | None = None) -> None:
        if self.error is None:
            self.error = message or str(exc)
            self.failure = Failure.ENGINE_UNAVAILABLE if isinstance(exc, EngineUnavailable) else Failure.ENGINE


class ServiceFailed(Exception):
    def __init__(
        self, message: str, rolled_back: bool = False, aborted: bool = False, failure: Failure | None = None
    ) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back
        #: the agent was stopping (or no drain was granted): not the new version's fault, so
        #: not quarantined
        self.aborted = aborted
        self.failure = failure


def health_deadline(spec: ServiceSpec, cap: float | None) -> float:
    hc = spec.healthcheck
    # With a healthcheck: the start period, then every retry at most interval + timeout apart.
    deadline = 15.0 if hc is None else hc.start_period_s + (hc.interval_s + hc.timeout_s) * (hc.retries + 1) + 5.0
    return min(deadline, cap) if cap else deadline


#: ``drain(service, reason, comes_back)``: a context manager around an action that stops the
#: service (``agent.node.drain.FleetDrain``): drained from the gateway before, restored after.
DrainFn = Callable[[str, str, bool], AbstractContextManager[None]]
#: The actions that stop a running service.
DISRUPTIVE = frozenset({ActionKind.RECREATE, ActionKind.RESTART, ActionKind.REMOVE})


@dataclass(frozen=True)
class Rollout:
    """What one apply acts for and how patient it is."""

    host: str
    commit: str
    #: cap, in seconds, on waiting for one service to be healthy
    health_cap_s: float | None = None
    say: Callable[[str], None] = lambda message: None
    #: the agent is shutting down: abandon waits (roll back, not quarantined)
    stopping: Callable[[], bool] = lambda: False
    #: without a healthcheck, how long a reloaded service must stay up to count as reloaded
    reload_settle_s: float = 2.0
    #: service -> restarts allowed for a new container that misses its deadline (role.yaml)
    start_retries: Mapping[str, int] = field(default_factory=dict)
    #: the rendered compose file, written to the stack dir (``docker compose ls`` names it)
    compose: str | None = None
    #: services drained from the gateway's routing (``role.yaml`` ``drain``) before an action
    #: stops them, and how (None: not drained)
    drained: frozenset[str] = frozenset()
    drain: DrainFn | None = None
    #: reload signals whose outcome the pass checks itself (the gateway's rolling worker reload:
    #: does a worker serve the new routing?): the container's healthcheck is not waited for.
    #: (An old gunicorn worker finishing long streams answers its readiness 503 for minutes,
    #: measured; taken for a failed reload, the proxy was restarted: an outage.)
    checked_signals: frozenset[str] = frozenset()


class Executor:
    def __init__(self, engine: Engine, stack_dir: Path, rollout: Rollout, clock: Clock | None = None) -> None:
        self.engine = engine
        self.stack_dir = stack_dir
        self.rollout = rollout
        self.clock = clock or SystemClock()
        self.say = rollout.say
        self.stopping = rollout.stopping
        self._previous: dict[Path, tuple[bytes, int] | None] = {}

    def apply(
        self, stack: StackSpec, actions: list[Action], known_images: dict[str, str | None] | None = None
    ) -> ApplyResult:
        """Carry out ``actions``; ``known_images`` are the image ids the pass observed."""
        result = ApplyResult()
        if self._refuse_conflicts(actions, result):
            return result
        image_ids = self._images(stack, actions, known_images or {}, result)
        if image_ids is None:
            return result
        self._previous = {}
        try:
            self._prepare(stack, actions, result)
            self._services(stack, actions, image_ids, result)
            if result.error is None:
                self._cleanup(stack, actions, result)
        except EngineError as exc:
            result.engine_failed(exc)
        except OSError as exc:  # the stack directory: disk full, permissions
            result.error = result.error or f"cannot write stack files under {self.stack_dir}: {exc.strerror}"
            result.failure = result.failure or Failure.STATE
        if result.error is not None:
            self._restore_files(self._previous)
        return result

    # ------------------------------------------------------------------ phases

    def _refuse_conflicts(self, actions: list[Action], result: ApplyResult) -> bool:
        for action in actions:
            if action.kind is ActionKind.CONFLICT:
                result.fail(action, action.reason, failure=Failure.CONFLICT)
        return result.error is not None

    def _images(
        self, stack: StackSpec, actions: list[Action], known: dict[str, str | None], result: ApplyResult
    ) -> dict[str, str | None] | None:
        """Every image the stack needs, by id; None (and the pass failed) if one cannot be had."""
        image_ids: dict[str, str | None] = {k: v for k, v in known.items() if v}
        for action in actions:
            if action.kind is ActionKind.PULL:
                self.say(f"pulling {action.target}")
                try:
                    image_ids[action.target] = self.engine.pull(action.target)
                except EngineError as exc:
                    result.outcomes.append(Outcome(action, False, str(exc)))
                    result.engine_failed(exc, f"image {action.target} cannot be had: {exc}; nothing was changed")
                    return None
                result.outcomes.append(Outcome(action, True, f"pulled {action.target}"))
        for svc in stack.services.values():
            if svc.image not in image_ids:
                image_ids[svc.image] = self.engine.image_id(svc.image)
            if image_ids[svc.image] is None:
                result.error = f"image {svc.image} is not present and was not pulled; nothing was changed"
                result.failure = Failure.ENGINE
                return None
        return image_ids

    def _prepare(self, stack: StackSpec, actions: list[Action], result: ApplyResult) -> None:
        """Files (each one's old content kept to put back on failure), networks, volumes."""
        self._write_files(stack)
        for action in actions:
            if action.kind is ActionKind.WRITE_FILE:  # every file was (re)written just above
                result.outcomes.append(Outcome(action, True, f"wrote {action.target}"))
            elif action.kind is ActionKind.CREATE_NETWORK:
                net = next(n for n in stack.networks.values() if network_name(stack, n.name) == action.target)
                self.engine.ensure_network(action.target, stack.project, net.name, net.driver)
                result.outcomes.append(Outcome(action, True))
        for vol in stack.volumes.values():
            if not vol.external:
                self.engine.ensure_volume(L.scoped(stack.project, vol.name), stack.project, vol.name, vol.driver)

    def _services(
        self, stack: StackSpec, actions: list[Action], image_ids: dict[str, str | None], result: ApplyResult
    ) -> None:
        """Wave by wave; independent services of a wave in parallel. Dependents of a failed
        service are not touched."""
        by_service: dict[str, list[Action]] = {}
        for action in actions:
            if action.kind in SERVICE_KINDS or (action.kind is ActionKind.REMOVE and action.target in stack.services):
                by_service.setdefault(action.target, []).append(action)
        for wave in stack.start_order():
            todo = {s: by_service[s] for s in wave if s in by_service}
            if not self._wave(stack, todo, image_ids, result):
                return

    def _wave(
        self,
        stack: StackSpec,
        todo: dict[str, list[Action]],
        image_ids: dict[str, str | None],
        result: ApplyResult,
    ) -> bool:
        with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, max(1, len(todo)))) as pool:
            futures = {
                # Each worker runs in a copy of this context: log lines keep the pass's run id.
                s: pool.submit(
                    contextvars.copy_context().run, self._service, stack, s, acts, image_ids[stack.services[s].image]
                )
                for s, acts in todo.items()
            }
        ok = True
        for s, future in futures.items():
            try:
                result.outcomes.extend(future.result())
            except EngineError as exc:
                ok = False
                result.outcomes.append(Outcome(todo[s][-1], False, str(exc)))
                result.engine_failed(exc, f"service '{s}': {exc}")
            except ServiceFailed as exc:
                ok = False
                result.rolled_back = result.rolled_back or exc.rolled_back
                result.rollout_failed = result.rollout_failed or not exc.aborted
                kind = exc.failure or (Failure.STOPPED if exc.aborted else Failure.ROLLOUT)
                result.fail(todo[s][-1], str(exc), f"service '{s}': {exc}", kind)
        return ok

    def _cleanup(self, stack: StackSpec, actions: list[Action], result: ApplyResult) -> None:
        for action in actions:
            if action.kind is ActionKind.REMOVE and action.target not in stack.services and action.container:
                self.say(f"removing orphan {action.target}")
                self.engine.remove(action.container, graceful=True)
                result.outcomes.append(Outcome(action, True))
        for action in actions:
            if action.kind is ActionKind.REMOVE_NETWORK:
                self.say(f"removing network {action.target}")
                self.engine.remove_network(action.target)  # one still in use is left for later
                result.outcomes.append(Outcome(action, True))

    # ------------------------------------------------------------------ per service

    def _service(self, stack: StackSpec, name: str, actions: list[Action], image_id: str | None) -> list[Outcome]:
        want = desired_service(stack, name, image_id)
        outcomes = []
        for action in actions:
            self._act(stack, want, action)
            outcomes.append(Outcome(action, True))
        return outcomes

    def _act(self, stack: StackSpec, want: Desired, action: Action) -> None:
        drain = self.rollout.drain
        if drain is None or action.kind not in DISRUPTIVE or action.container is None:
            self._do(stack, want, action)
            return
        if want.spec.name not in self.rollout.drained:
            self._do(stack, want, action)
            return
        try:
            with drain(want.spec.name, action.reason, action.kind is not ActionKind.REMOVE):
                self._do(stack, want, action)
        except DrainNotGranted as exc:
            raise ServiceFailed(str(exc), aborted=True, failure=Failure.DRAIN) from None
        except DrainAborted as exc:
            raise ServiceFailed(str(exc), aborted=True) from None

    def _do(self, stack: StackSpec, want: Desired, action: Action) -> None:
        name, cid = want.spec.name, action.container
        if action.kind is ActionKind.CREATE:
            self.say(f"{name}: creating")
            self._create_and_wait(stack, want, container_name(stack, name))
        elif cid is None:
            return  # noop, or nothing to act on
        elif action.kind is ActionKind.REMOVE:
            self.say(f"{name}: removing {action.reason}")
            self.engine.remove(cid, grace_s=_grace(want))
        elif action.kind is ActionKind.RECREATE:
            self.say(f"{name}: replacing ({action.reason})")
            self._replace(stack, want, cid)
        elif action.kind is ActionKind.START:
            self.say(f"{name}: starting")
            self.engine.start(cid)
            self._wait(want.spec, cid)
            if action.changed:  # started on new mounted files
                record_files(self.stack_dir, cid, want, self.rollout.commit)
        elif action.kind is ActionKind.RESTART:
            self._restart(want, cid, action.reason)
        elif action.kind is ActionKind.RELOAD and action.signal:
            self._reload(want, cid, action.signal, action.reason)

    def _labels(self, stack: StackSpec, want: Desired) -> dict[str, str]:
        labels = container_labels(stack, want, self.rollout.host, self.rollout.commit)
        return {
            **labels,
            L.WORKING_DIR: str(self.stack_dir),
            L.CONFIG_FILES: str(self.stack_dir / L.COMPOSE_FILE),
        }

    def _restart(self, want: Desired, cid: str, reason: str) -> None:
        """Restart on new mounted files; if it does not come back, restart it on the old ones."""
        self.say(f"{want.spec.name}: restarting ({reason})")
        self.engine.restart(cid, timeout=_grace(want))
        try:
            self._wait(want.spec, cid)
        except ServiceFailed as exc:
            if exc.aborted:
                raise
            self._restore_files(self._previous, only=want)
            self.engine.restart(cid, timeout=_grace(want))
            raise ServiceFailed(f"restart on the new files failed ({exc}); restarted on the old files", True) from None
        # Labels cannot change on a live container: remember the files it now runs with.
        record_files(self.stack_dir, cid, want, self.rollout.commit)

    def _reload(self, want: Desired, cid: str, sig: str, reason: str) -> None:
        """Signal, then make sure the service survived it: still running and, with a
        healthcheck, a probe that started after the signal passed. If not, old files back."""
        self.say(f"{want.spec.name}: sending {sig} ({reason})")
        sent = self.clock.time()
        self.engine.signal(cid, sig)
        why = self._verify_reload(want, cid, sent, sig)
        if why is None:
            record_files(self.stack_dir, cid, want, self.rollout.commit)
            return
        self._restore_files(self._previous, only=want)
        try:
            self.engine.restart(cid, timeout=_grace(want))
        except EngineError as exc:
            raise ServiceFailed(f"reload with {sig} failed ({why}) and restart failed: {exc}") from None
        raise ServiceFailed(f"reload with {sig} failed ({why}); old files restored, restarted", True)

    def _verify_reload(self, want: Desired, cid: str, sent: float, sig: str = "") -> str | None:
        hc = None if sig in self.rollout.checked_signals else want.spec.healthcheck
        settle = self.rollout.reload_settle_s
        end = self.clock.monotonic() + (settle if hc is None else health_deadline(want.spec, self.rollout.health_cap_s))
        self.clock.sleep(min(settle, 0.5))
        while True:
            status, _health, code = self.engine.state(cid)
            if status != "running":
                return f"{status}, exit {code}"
            if hc is not None and self.engine.probe_passed_since(cid, sent):
                return None
            if self.clock.monotonic() >= end:
                return None if hc is None else "no passing healthcheck after the signal"
            if self.stopping():
                return None  # shutting down: leave it be; the next start checks again
            self.clock.sleep(POLL_S)

    def _create_and_wait(self, stack: StackSpec, want: Desired, name: str) -> str:
        cid = self.engine.create(stack, want.spec, name, self._labels(stack, want), str(self.stack_dir))
        try:
            self.engine.start(cid)
            self._wait(want.spec, cid)
        except (ServiceFailed, EngineError):
            self.engine.remove(cid)
            raise
        return cid

    def _wait(self, spec: ServiceSpec, cid: str) -> None:
        """Healthy within the deadline, or ``ServiceFailed``; a hang may be given restarts."""
        waited = HealthWait(WaitEnd.TIMEOUT)
        for attempt in range(self.rollout.start_retries.get(spec.name, 0) + 1):
            if attempt:
                self.say(f"{spec.name}: not healthy in time; restarting it (try {attempt + 1})")
                self.engine.restart(cid)
            waited = self.wait_healthy(spec, cid, health_deadline(spec, self.rollout.health_cap_s))
            if waited.ok:
                return
            if waited.end is WaitEnd.STOPPING:
                raise ServiceFailed(str(waited), aborted=True)
            if waited.crashed:
                break  # a crash is not a hang: no point restarting it
        raise ServiceFailed(str(waited))

    def wait_healthy(self, spec: ServiceSpec, cid: str, deadline_s: float) -> HealthWait:
        """Poll until healthy (or running, without a healthcheck), crashed, unhealthy, past the
        deadline or the agent stopping; says every ``WAIT_NOTE_S`` what it is waiting for."""
        has_hc = spec.healthcheck is not None
        start = self.clock.monotonic()
        next_note = start + WAIT_NOTE_S
        while True:
            if self.stopping():
                return HealthWait(WaitEnd.STOPPING, "the agent is stopping: rollout abandoned")
            status, health, code = self.engine.state(cid)
            ended = _wait_ended(status, health, code, has_hc)
            if ended is not None:
                if ended.crashed:
                    last = self._last_log_line(cid)
                    return HealthWait(ended.end, ended.detail + (f": {last}" if last else ""))
                return ended
            now = self.clock.monotonic()
            if now >= start + deadline_s:
                return HealthWait(
                    WaitEnd.TIMEOUT, f"not healthy within {deadline_s:.0f}s (status {status}, health {health})"
                )
            if now >= next_note:
                next_note = now + WAIT_NOTE_S
                self._note_waiting(spec.name, cid, now - start, deadline_s, f"{status}, health {health or 'none'}")
            self.clock.sleep(POLL_S)

    def _note_waiting(self, name: str, cid: str, waited: float, deadline_s: float, state: str) -> None:
        last = self._last_log_line(cid)
        self.say(
            f"{name}: waiting to be healthy, {waited:.0f}s of {deadline_s:.0f}s ({state})"
            + (f"; last log line: {last}" if last else "")
        )

    def _last_log_line(self, cid: str) -> str:
        tail = self.engine.logs_tail(cid, lines=1)
        return tail.splitlines()[-1][:300] if tail else ""

    def _replace(self, stack: StackSpec, want: Desired, old: str) -> None:
        final = container_name(stack, want.spec.name)
        suffix = pysecrets.token_hex(3)
        grace = _grace(want)
        new = self.engine.create(
            stack, want.spec, f"{final}-new-{suffix}", self._labels(stack, want), str(self.stack_dir)
        )
        stateful = any(m.type == "volume" for m in want.spec.mounts)
        if not want.spec.ports and not stateful:
            # Case: nothing in the way: the new one is healthy before the old one goes.
            try:
                self.engine.start(new)
                self._wait(want.spec, new)
            except Exception as exc:
                self.engine.remove(new)
                aborted = isinstance(exc, ServiceFailed) and exc.aborted
                raise ServiceFailed(
                    f"new container failed ({exc}); rolled back, old container kept", True, aborted
                ) from None
            self.engine.remove(old, grace_s=grace)
            self.engine.rename(new, final)
            return
        # Case: host ports, or a data volume two processes must not share: stop the old one
        # gracefully (kept for rollback), then start the new one.
        try:
            self.engine.stop(old, timeout=grace)
            self.engine.rename(old, f"{final}-old-{suffix}")
            self.engine.rename(new, final)
            self.engine.start(new)
            self._wait(want.spec, new)
        except Exception as exc:  # whatever went wrong, the old container comes back
            self._roll_back(new, old, final, exc, want)
        self.engine.remove(old)

    def _roll_back(self, new: str, old: str, final: str, why: Exception, want: Desired) -> None:
        """Bring the old container back under its name, on the old files. Each step is tried
        even if an earlier one failed; the failure says plainly if the old one is not back."""
        problems = []
        steps: list[Callable[[], None]] = [
            lambda: self.engine.remove(new),
            lambda: self._restore_files(self._previous, only=want),
            lambda: self.engine.rename(old, final),
            lambda: self.engine.start(old),
        ]
        for step in steps:
            try:
                step()
            except (EngineError, OSError) as exc:
                problems.append(str(exc))
        if problems:
            raise ServiceFailed(
                f"new container failed ({why}); ROLLBACK INCOMPLETE, the old container may be down: "
                + "; ".join(problems),
                True,
            ) from None
        aborted = isinstance(why, ServiceFailed) and why.aborted
        raise ServiceFailed(
            f"new container failed ({why}); rolled back, old container restarted", True, aborted
        ) from None

    # ------------------------------------------------------------------ files

    def _write_files(self, stack: StackSpec) -> None:
        """Write the stack's files, remembering each one's previous content *before* it is
        replaced, so a failure half-way still puts back exactly what was there."""
        self.stack_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = [(f.path, f.content.encode(), f.mode) for f in stack.files.values()]
        if self.rollout.compose is not None and L.COMPOSE_FILE not in stack.files:
            files.insert(0, (L.COMPOSE_FILE, self.rollout.compose.encode(), 0o600))
        for rel, content, mode in files:
            path = self.stack_dir / rel
            old = (path.read_bytes(), path.stat().st_mode & 0o777) if path.is_file() else None
            if old == (content, mode):
                continue
            self._previous[path] = old
            write_atomic(path, content, mode)

    def _restore_files(self, previous: dict[Path, tuple[bytes, int] | None], only: Desired | None = None) -> None:
        """Put files back; with ``only``, just the files that service mounts (a worker
        rolling back one service must not rewrite its siblings' files under them)."""
        mine = {self.stack_dir / p for p in only.files} if only is not None else None
        for path, old in previous.items():
            if mine is not None and path not in mine:
                continue
            if old is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, old[0], old[1])


def _grace(want: Desired) -> int:
    """Seconds a container gets between SIGTERM and SIGKILL (compose's stop_grace_period)."""
    return int(want.spec.stop_grace_period_s or 10)


RELOADS = ".reloads.json"
_RELOADS_LOCK = threading.Lock()


def record_files(stack_dir: Path, container: str, want: Desired, commit: str) -> None:
    """A container now runs with new mounted files (reloaded or restarted in place), from
    ``commit``: its labels cannot change, so the effective commit is recorded with the files."""
    path = stack_dir / RELOADS
    with _RELOADS_LOCK:
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[container] = {"files_hash": want.files_hash, "files": want.files, "commit": commit}
        write_atomic(path, json.dumps(data).encode(), 0o600)


def with_reloads(observed: Observed, stack_dir: Path, prune: bool = True) -> Observed:
    """Observed containers as they run after in-place reloads (the label diffbase + reloads)."""
    path = stack_dir / RELOADS
    if not path.is_file():
        return observed
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return observed
    live = {c.id for c in observed.containers}
    if prune and set(data) - live:  # forget containers that are gone
        data = {k: v for k, v in data.items() if k in live}
        write_atomic(path, json.dumps(data).encode(), 0o600)
    patched = []
    for c in observed.containers:
        if c.id not in data:
            patched.append(c)
            continue
        labels = {
            **c.labels,
            L.FILES_HASH: data[c.id]["files_hash"],
            L.FILES: canonical_json(data[c.id]["files"]),
        }
        if data[c.id].get("commit"):  # recorded by agents since the commit was recorded too
            labels[L.COMMIT] = data[c.id]["commit"]
        patched.append(c.model_copy(update={"labels": labels}))
    return observed.model_copy(update={"containers": tuple(patched)})


def _wait_ended(status: str, health: str | None, code: int, has_healthcheck: bool) -> HealthWait | None:
    """How a wait ends given one observation of the container, or None to keep waiting."""
    if status in ("exited", "dead"):
        return HealthWait(WaitEnd.EXITED, f"exited with code {code}")
    if status == "restarting":
        return HealthWait(WaitEnd.RESTART_LOOP, f"exited with code {code} (restart loop)")
    if has_healthcheck and health == "healthy":
        return HealthWait(WaitEnd.HEALTHY)
    if has_healthcheck and health == "unhealthy":
        return HealthWait(WaitEnd.UNHEALTHY, "healthcheck reports unhealthy")
    if not has_healthcheck and status == "running":
        # Without a healthcheck, running is ready (as for compose); give a service a
        # healthcheck to have its new version watched and rolled back.
        return HealthWait(WaitEnd.HEALTHY)
    return None
