"""Carries out a plan against the engine: files, networks, then containers, safely.

The only place that changes anything. Order and safety rules:

- images are pulled before anything running is touched; an image that cannot be had fails
  the pass with nothing changed;
- stack files are written atomically into the stack directory (mounted as directories), and
  put back as they were if the pass fails;
- services start in ``depends_on`` waves, independent ones in parallel (up to 8 workers), and
  each waits for health within a deadline that honours its healthcheck's start period;
- a replacement creates the new container before the old one stops; where no host port is in
  the way, the new one is healthy before the old one goes. A new container that fails its
  deadline or exits is removed and the old one brought back.
"""

from __future__ import annotations

import contextvars
import json
import secrets as pysecrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.adapters.engine import Engine, EngineError
from agent.adapters.fs import write_atomic
from agent.core import labels as L
from agent.core.hashing import canonical_json
from agent.core.observed import Observed
from agent.core.plan import Action, Desired, container_labels, container_name, desired_service, network_name
from agent.core.stack import ServiceSpec, StackSpec

log = structlog.get_logger("agent.executor")

MAX_WORKERS = 8
STOPPING = "the agent is stopping"


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

    @property
    def ok(self) -> bool:
        return self.error is None and all(o.ok for o in self.outcomes)


class ServiceFailed(Exception):
    def __init__(self, message: str, rolled_back: bool = False, aborted: bool = False) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back
        #: the agent was stopping: not the new version's fault, so not quarantined
        self.aborted = aborted


def health_deadline(spec: ServiceSpec, cap: float | None) -> float:
    hc = spec.healthcheck
    # With a healthcheck: the start period, then every retry at most interval + timeout apart.
    deadline = 15.0 if hc is None else hc.start_period_s + (hc.interval_s + hc.timeout_s) * (hc.retries + 1) + 5.0
    return min(deadline, cap) if cap else deadline


class Executor:
    def __init__(
        self,
        engine: Engine,
        stack_dir: Path,
        host: str,
        commit: str,
        health_cap_s: float | None = None,
        on_event: Callable[[str], None] | None = None,
        stopping: Callable[[], bool] = lambda: False,
        reload_settle_s: float = 2.0,
        start_retries: Mapping[str, int] | None = None,
    ) -> None:
        self.start_retries = dict(start_retries or {})
        self.engine = engine
        self.stack_dir = stack_dir
        self.host = host
        self.commit = commit
        self.health_cap_s = health_cap_s
        self.say = on_event or (lambda msg: None)
        self.stopping = stopping
        self.reload_settle_s = reload_settle_s
        self._previous: dict[Path, tuple[bytes, int] | None] = {}

    def apply(
        self, stack: StackSpec, actions: list[Action], known_images: dict[str, str | None] | None = None
    ) -> ApplyResult:
        """Carry out ``actions``; ``known_images`` are the image ids the pass observed."""
        result = ApplyResult()
        conflicts = [a for a in actions if a.kind == "conflict"]
        if conflicts:
            result.outcomes = [Outcome(a, False, a.reason) for a in conflicts]
            result.error = conflicts[0].reason
            return result

        # 1. Images, before anything running is touched.
        image_ids: dict[str, str | None] = {k: v for k, v in (known_images or {}).items() if v}
        for action in actions:
            if action.kind == "pull":
                self.say(f"pulling {action.target}")
                try:
                    image_ids[action.target] = self.engine.pull(action.target)
                except EngineError as exc:
                    result.outcomes.append(Outcome(action, False, str(exc)))
                    result.error = f"image {action.target} cannot be had: {exc}; nothing was changed"
                    return result
                result.outcomes.append(Outcome(action, True, f"pulled {action.target}"))
        for svc in stack.services.values():
            if svc.image not in image_ids:
                image_ids[svc.image] = self.engine.image_id(svc.image)
            if image_ids[svc.image] is None:
                result.error = f"image {svc.image} is not present and was not pulled; nothing was changed"
                return result

        # 2. Files (kept to put back on failure), networks.
        self._previous = {}
        try:
            self._write_files(stack)
            for action in actions:
                if action.kind == "create_network":
                    net = next(n for n in stack.networks.values() if network_name(stack, n.name) == action.target)
                    self.engine.ensure_network(action.target, stack.project, net.name, net.driver)
                    result.outcomes.append(Outcome(action, True))
            for vol in stack.volumes.values():
                if not vol.external:
                    self.engine.ensure_volume(f"{stack.project}_{vol.name}", stack.project, vol.name, vol.driver)

            # 3. Services, wave by wave; independent services of a wave in parallel.
            by_service: dict[str, list[Action]] = {}
            for action in actions:
                if action.kind in ("create", "recreate", "start", "reload", "restart", "noop") or (
                    action.kind == "remove" and action.target in stack.services
                ):
                    by_service.setdefault(action.target, []).append(action)
            for wave in stack.start_order():
                todo = [s for s in wave if s in by_service]
                with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, max(1, len(todo)))) as pool:
                    futures = {
                        # Each worker runs in a copy of this context: log lines keep the pass's run id.
                        s: pool.submit(
                            contextvars.copy_context().run,
                            self._service,
                            stack,
                            s,
                            by_service[s],
                            image_ids[stack.services[s].image],
                        )
                        for s in todo
                    }
                failed = False
                for s in todo:
                    try:
                        result.outcomes.extend(futures[s].result())
                    except EngineError as exc:
                        failed = True
                        result.outcomes.append(Outcome(by_service[s][-1], False, str(exc)))
                        result.error = result.error or f"service '{s}': {exc}"
                    except ServiceFailed as exc:
                        failed = True
                        result.rolled_back = result.rolled_back or exc.rolled_back
                        result.rollout_failed = result.rollout_failed or not exc.aborted
                        result.outcomes.append(Outcome(by_service[s][-1], False, str(exc)))
                        result.error = result.error or f"service '{s}': {exc}"
                if failed:
                    break  # dependents of a failed service are not touched

            # 4. Orphans, once everything wanted is up.
            if result.error is None:
                for action in actions:
                    if action.kind == "remove" and action.target not in stack.services and action.container:
                        self.say(f"removing orphan {action.target}")
                        self.engine.remove(action.container, graceful=True)
                        result.outcomes.append(Outcome(action, True))
                for action in actions:
                    if action.kind == "remove_network":
                        self.say(f"removing network {action.target}")
                        self.engine.remove_network(action.target)  # "active endpoints" tolerated
                        result.outcomes.append(Outcome(action, True))
        except EngineError as exc:
            result.error = str(exc)
        except OSError as exc:  # the stack directory: disk full, permissions
            result.error = f"cannot write stack files under {self.stack_dir}: {exc.strerror}"
        if result.error is not None:
            self._restore_files(self._previous)
        return result

    # ------------------------------------------------------------------ per service

    def _service(self, stack: StackSpec, name: str, actions: list[Action], image_id: str | None) -> list[Outcome]:
        want = desired_service(stack, name, image_id)
        outcomes = []
        for action in actions:
            if action.kind == "remove" and action.container:
                self.say(f"{name}: removing {action.reason}")
                self.engine.remove(action.container, grace_s=_grace(want))
            elif action.kind == "create":
                self.say(f"{name}: creating")
                self._create_and_wait(stack, want, container_name(stack, name))
            elif action.kind == "recreate" and action.container:
                self.say(f"{name}: replacing ({action.reason})")
                self._replace(stack, want, action.container)
            elif action.kind == "start" and action.container:
                self.say(f"{name}: starting")
                self.engine.start(action.container)
                self._wait(want.spec, action.container)
                if action.changed:  # started on new mounted files
                    record_files(self.stack_dir, action.container, want)
            elif action.kind == "restart" and action.container:
                self._restart(want, action.container, action.reason)
            elif action.kind == "reload" and action.container and action.signal:
                self._reload(want, action.container, action.signal, action.reason)
            outcomes.append(Outcome(action, True))
        return outcomes

    def _labels(self, stack: StackSpec, want: Desired) -> dict[str, str]:
        return {**container_labels(stack, want, self.host, self.commit), L.WORKING_DIR: str(self.stack_dir)}

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
        record_files(self.stack_dir, cid, want)

    def _reload(self, want: Desired, cid: str, sig: str, reason: str) -> None:
        """Signal, then make sure the service survived it: still running and, with a
        healthcheck, a probe that started after the signal passed. If not, old files back."""
        self.say(f"{want.spec.name}: sending {sig} ({reason})")
        sent = time.time()
        self.engine.signal(cid, sig)
        why = self._verify_reload(want, cid, sent)
        if why is None:
            record_files(self.stack_dir, cid, want)
            return
        self._restore_files(self._previous, only=want)
        try:
            self.engine.restart(cid, timeout=_grace(want))
        except EngineError as exc:
            raise ServiceFailed(f"reload with {sig} failed ({why}) and restart failed: {exc}") from None
        raise ServiceFailed(f"reload with {sig} failed ({why}); old files restored, restarted", True)

    def _verify_reload(self, want: Desired, cid: str, sent: float) -> str | None:
        hc = want.spec.healthcheck
        end = time.monotonic() + (self.reload_settle_s if hc is None else health_deadline(want.spec, self.health_cap_s))
        time.sleep(min(self.reload_settle_s, 0.5))
        while True:
            status, _health, code = self.engine.state(cid)
            if status != "running":
                return f"{status}, exit {code}"
            if hc is not None and self.engine.probe_passed_since(cid, sent):
                return None
            if time.monotonic() >= end:
                return None if hc is None else "no passing healthcheck after the signal"
            if self.stopping():
                return None  # shutting down: leave it be; the next start checks again
            time.sleep(0.25)

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
        for attempt in range(self.start_retries.get(spec.name, 0) + 1):
            if attempt:
                self.say(f"{spec.name}: not healthy in time; restarting it (try {attempt + 1})")
                self.engine.restart(cid)
            why = self.engine.wait_healthy(
                cid, health_deadline(spec, self.health_cap_s), spec.healthcheck is not None, self.stopping
            )
            if why is None:
                return
            if why.startswith(STOPPING):
                raise ServiceFailed(why, aborted=True)
            if why.startswith("exited"):
                break  # a crash is not a hang: no point restarting it
        raise ServiceFailed(why or "not healthy")

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
        for f in stack.files.values():
            path = self.stack_dir / f.path
            old = (path.read_bytes(), path.stat().st_mode & 0o777) if path.is_file() else None
            if old == (f.content.encode(), f.mode):
                continue
            self._previous[path] = old
            write_atomic(path, f.content.encode(), f.mode)

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


def record_files(stack_dir: Path, container: str, want: Desired) -> None:
    """A container now runs with new mounted files (reloaded or restarted in place)."""
    path = stack_dir / RELOADS
    with _RELOADS_LOCK:
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[container] = {"files_hash": want.files_hash, "files": want.files}
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
        patched.append(c.model_copy(update={"labels": labels}))
    return observed.model_copy(update={"containers": tuple(patched)})
