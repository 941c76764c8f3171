"""One reconcile pass: desired state -> render -> observe -> plan -> execute -> record.

Used by ``agent plan`` (dry run), ``agent apply`` (one pass) and the daemon (every interval).
Every pass observes afresh before it decides. A pass that had to roll back quarantines that
desired state (by fingerprint): it is not retried every pass, only once the desired state
changes (or with ``retry_quarantined``). How a pass ended is typed (``PassOutcome``, and a
``Failure`` saying why it failed); callers decide on those, never on message text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets as pysecrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.adapters import proxy
from agent.adapters.fs import LockHeld, UnsafePath, locked, machine_lock_dir, private_dir
from agent.adapters.gitsource import tree_commit
from agent.adapters.secrets import SecretResolver
from agent.core import bearer
from agent.core import labels as L
from agent.core.errors import (
    AgentError,
    ConfigError,
    DesiredStateError,
    EngineError,
    EngineUnavailable,
    SecretError,
)
from agent.core.fleet import DesiredState
from agent.core.hashing import file_hashes
from agent.core.lint import lint_fleet, lint_stack
from agent.core.model import GpuNodeVars, MotokoVars
from agent.core.observed import UNREADABLE, Observed, StackDir
from agent.core.outcomes import ActionKind, Failure, PassOutcome
from agent.core.plan import Action, container_name, pending, plan
from agent.core.ports import Clock, Engine, SystemClock
from agent.core.redact import scrub
from agent.core.rendered import RenderedStack, project_name
from agent.core.routing import Health
from agent.core.stack import StackFile, StackSpec
from agent.desired.load import load_desired
from agent.desired.render import render_host
from agent.node.drain import DrainTarget
from agent.node.executor import ApplyResult, DrainFn, Executor, Rollout, with_reloads
from agent.node.settings import Settings
from agent.node.state import AgentState, Quarantined, Run, StateStore, now

log = structlog.get_logger("agent.reconcile")

#: The engine a pass talks to when ``DOCKER_HOST`` is unset (docker's own default).
DEFAULT_ENGINE = "unix:///var/run/docker.sock"


@dataclass
class PassResult:
    host: str
    project: str = ""
    commit: str = ""
    result: PassOutcome = PassOutcome.FAILED
    error: str | None = None
    #: why the pass failed (None when it did not)
    failure: Failure | None = None
    actions: list[Action] = field(default_factory=list)
    applied: ApplyResult | None = None
    run_id: str = field(default_factory=lambda: pysecrets.token_hex(4))
    role: str = ""
    #: service -> {container, state, health}, as last observed in this pass
    services: dict[str, dict[str, str | None]] = field(default_factory=dict)
    #: on the gateway: alias -> {backend, reason, chain (the deployments in order)} in effect
    routing: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: after a rolling reload of the gateway's proxy: did it serve the new routing
    reload_check: dict[str, Any] | None = None
    #: why another pass must follow this one at once (a bearer-token rotation's second step)
    follow_up: str | None = None
    started: float = 0.0
    finished: float = 0.0

    def fail(self, failure: Failure, message: str) -> None:
        self.result, self.failure, self.error = PassOutcome.FAILED, failure, message

    def changed(self) -> int:
        """How many actions changed something on the engine."""
        return len(self.applied.changed()) if self.applied is not None else 0

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "run_id": self.run_id,
            "host": self.host,
            "project": self.project,
            "commit": self.commit,
            "result": self.result,
            "error": self.error,
            "failure": self.failure,
            "role": self.role,
            "started": self.started,
            "finished": self.finished,
            "actions": [a.as_dict() for a in self.actions],
            "services": self.services,
            "routing": self.routing,
        }
        if self.reload_check is not None:
            out["reload_check"] = self.reload_check
        if self.follow_up is not None:
            out["follow_up"] = self.follow_up
        if self.applied is not None:
            out["outcomes"] = [o.as_dict() for o in self.applied.outcomes]
            out["rolled_back"] = self.applied.rolled_back
        return out


#: The gateway's reload: one more proxy worker on the new config, then the oldest retired.
ROLLING_RELOAD = "SIGTTIN"
RETIRE_WORKER = "SIGTTOU"
#: How long a rolling reload may take to serve the new routing (a worker boots in seconds).
RELOAD_CHECK_S = 60.0


@dataclass(frozen=True)
class PassOptions:
    #: ``agent plan``: read only; no lock, nothing written or recorded
    dry_run: bool = False
    retry_quarantined: bool = False
    health_cap_s: float | None = None
    say: Callable[[str], None] = lambda message: None
    #: called with every secret value resolved (the daemon feeds its log redactor)
    on_secret: Callable[[str], None] | None = None
    run_id: str | None = None
    stopping: Callable[[], bool] = lambda: False
    #: False: apply without recording the run (healing on the last good commit)
    record: bool = True
    #: On the gateway: backend health to route by (the motoko agent's routing loop); None:
    #: every backend counts as healthy.
    health: Mapping[str, Health] | None = None
    #: On a backend host: how its drains are done (the daemon's ``FleetDrain`` over HTTP; a
    #: test's fake); None: services are replaced without a drain (``agent apply`` by hand).
    drain: Callable[[DrainTarget], DrainFn] | None = None


def fingerprint(rendered: RenderedStack) -> str:
    """Identity of a desired stack (secret values only as part of a hash)."""
    return hashlib.sha256(rendered.stack.model_dump_json().encode()).hexdigest()[:16]


def failure_of(exc: Exception) -> Failure:
    """The typed reason for an error that ended a pass."""
    kinds: list[tuple[type[Exception], Failure]] = [
        (DesiredStateError, Failure.DESIRED_STATE),
        (SecretError, Failure.SECRET),
        (EngineUnavailable, Failure.ENGINE_UNAVAILABLE),
        (EngineError, Failure.ENGINE),
        (LockHeld, Failure.LOCKED),
        (UnsafePath, Failure.STATE),
        (ConfigError, Failure.CONFIG),
        (OSError, Failure.STATE),
    ]
    return next((failure for kind, failure in kinds if isinstance(exc, kind)), Failure.INTERNAL)


def reconcile_once(
    settings: Settings,
    engine: Engine,
    repo: Path | None = None,
    commit: str | None = None,
    options: PassOptions | None = None,
    clock: Clock | None = None,
) -> PassResult:
    """One pass over the desired state at ``repo`` (a directory; ``commit`` names it)."""
    options = options or PassOptions()
    repo = repo or Path(settings.repo)
    result = PassResult(host=settings.host, commit=commit or tree_commit(repo))
    if options.run_id:
        result.run_id = options.run_id
    resolver = SecretResolver.for_repo(repo, settings.secrets_file, settings.identity_file, options.on_secret)
    run = Pass(settings, engine, repo, resolver, options, clock or SystemClock(), result)
    result.started = now()
    applied_fp: str | None = None
    try:
        # A dry run takes no lock: it must not wait for, or block, a real pass.
        with contextlib.nullcontext() if options.dry_run else pass_lock(settings):
            applied_fp = run.run()
    except (AgentError, OSError) as exc:
        result.fail(failure_of(exc), _message(exc))
    _scrub_result(result, resolver.known_values())
    if options.record and not options.dry_run:
        _record(run.store, result, applied_fp)
    return result


@contextlib.contextmanager
def pass_lock(settings: Settings) -> Iterator[None]:
    """One pass at a time per host; released by the kernel if the process dies. Two locks:
    the state dir's, and one per engine and compose project in a machine-wide directory, so
    two agents with different state dirs never interleave on the same containers."""
    private_dir(settings.state_dir)
    busy = "another pass is running on this host"
    machine_lock = machine_lock_dir() / f"pass-{host_lock_key(settings)}.lock"
    with locked(settings.state_dir / "pass.lock", busy, write_pid=True), locked(machine_lock, busy, write_pid=True):
        yield


def host_lock_key(settings: Settings) -> str:
    """Engine address and compose project, hashed: what two passes must not share at once."""
    engine = os.environ.get("DOCKER_HOST") or DEFAULT_ENGINE
    project = project_name(settings.host, settings.project_prefix)
    return hashlib.sha256(f"{engine}\0{project}".encode()).hexdigest()[:16]


def _message(exc: Exception) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, AgentError):
        return f"{exc.filename or 'state dir'}: {exc.strerror}"
    return str(exc)


class Pass:
    """The steps of one pass, over one context (what used to be twelve parameters)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        repo: Path,
        resolver: SecretResolver,
        options: PassOptions,
        clock: Clock,
        result: PassResult,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.repo = repo
        self.resolver = resolver
        self.options = options
        self.clock = clock
        self.result = result
        self.store = StateStore(settings.state_dir)
        #: the rendered compose file (secret-free: render refuses a leak into it)
        self.compose: str | None = None
        #: on the gateway: its proxy's URL on this host, master key and config file
        self.gateway: tuple[str, str, str] | None = None
        #: on a backend host: the services drained before they are replaced, and from where
        self.drained: frozenset[str] = frozenset()
        self.drain_target: DrainTarget | None = None
        #: on the gateway, during a bearer-token rotation: which of its two reloads this is
        self.rotation: str | None = None
        #: on the gateway: the generation of the keys the new config accepts, when they change
        #: (a new proxy worker is told from the old ones by it; ``proxy.wait_generation``)
        self.generation: str | None = None

    def run(self) -> str | None:
        """Render, observe, plan, maybe apply. Returns the fingerprint now applied, if any."""
        rendered, policy, retries = self.render()
        stack = rendered.stack
        stack_dir = self.store.stack_dir(stack.project)
        fp = fingerprint(rendered)
        observed = self.observe(stack, stack_dir)
        self.result.actions = self.with_rotation(stack, plan(stack, observed, policy))
        self.result.services = _services(stack, observed)
        if not pending(self.result.actions):
            self.result.result = PassOutcome.CONVERGED
            return fp
        if self.options.dry_run:
            self.result.result = PassOutcome.PENDING
            return None
        if self.quarantined(fp):
            return None
        executor = Executor(self.engine, stack_dir, self.rollout(retries), self.clock)
        self.result.applied = executor.apply(stack, self.result.actions, observed.images)
        if not self.result.applied.ok:
            self.rollout_failed(fp)
            return None
        self.finish_rolling_reloads(rendered)
        if not self.verify(stack, stack_dir, policy):
            return None
        reloaded = self.result.reload_check is None or self.result.reload_check["ok"]
        if self.rotation == bearer.ROTATION_STARTED and reloaded:
            # Every worker now accepts both keys; the next pass (its config on disk holds the
            # new key) renders the new one alone and retires the old one. At once, not at the
            # next interval: the old key must not outlive the rotation. (After a reload that
            # did not complete, the next pass at its interval does it, as any other.)
            self.result.follow_up = bearer.ROTATION_FOLLOW_UP
        return fp

    def with_rotation(self, stack: StackSpec, actions: list[Action]) -> list[Action]:
        """The actions, the proxy's saying which step of a bearer-token rotation it is."""
        if self.rotation is None or self.gateway is None:
            return actions
        config = self.gateway[2]

        def mounts(a: Action) -> bool:
            return a.target in stack.services and any(f.path == config for f in stack.mounted_files(a.target))

        return [
            dataclasses.replace(a, reason=f"{a.reason}; {self.rotation}")
            if a.kind is not ActionKind.NOOP and (config in a.changed or mounts(a))
            else a
            for a in actions
        ]

    def finish_rolling_reloads(self, rendered: RenderedStack) -> None:
        """A gateway proxy reloaded by SIGTTIN (one more gunicorn worker, on the new config):
        once a worker serves the new routing, SIGTTOU retires the oldest; then every answer
        must be the new routing (``agent.adapters.proxy.rolling_reload``)."""
        applied = self.result.applied
        if self.gateway is None or applied is None:
            return
        url, key, config = self.gateway
        text = rendered.stack.files[config].content if config in rendered.stack.files else ""
        # The key of the config being applied (after a rotation, the new one: the old workers
        # refuse it, so only a worker on the new config passes the check).
        key = proxy.master_key(text) or key
        for outcome in applied.changed():
            a = outcome.action
            if a.kind is not ActionKind.RELOAD or a.signal != ROLLING_RELOAD or not a.container:
                continue
            cid = a.container

            def retire(cid: str = cid) -> None:
                self.engine.signal(cid, RETIRE_WORKER)

            check = proxy.rolling_reload(url, key, proxy.config_ids(text), retire, RELOAD_CHECK_S, self.generation)
            self.result.reload_check = {
                "service": a.target,
                "ok": check.ok,
                "detail": check.detail,
                "seconds": round(check.seconds, 2),
                "container": cid,
            }
            (self.options.say)(f"{a.target}: {check.detail} ({check.seconds:.1f} s)")

    def render(self) -> tuple[RenderedStack, dict[str, str], dict[str, int]]:
        desired = load_desired(self.repo)
        on_disk = self.proxy_config_on_disk(desired)
        previous = proxy.master_key(on_disk) if on_disk is not None else None
        if previous is not None:
            # The old key, during a rotation: as secret as the new one (logs, errors, files).
            self.resolver.remember("previous litellm_bearer_token", previous)
        rendered = render_host(
            desired,
            self.settings.host,
            self.resolver,
            reveal=True,
            prefix=self.settings.project_prefix,
            health=self.options.health,
            previous_master_key=previous,
        )
        # What LiteLLM would silently accept (or die on at SIGHUP) never reaches the host.
        errors = [p for p in lint_fleet(desired) + lint_stack(desired, rendered) if p.severity == "error"]
        if errors:
            raise DesiredStateError(errors)
        self.result.project = rendered.stack.project
        self.result.role = rendered.role
        self.compose = rendered.compose
        self.result.routing = {
            a: {"backend": d.backend.name, "reason": d.reason, "chain": [b.name for b in d.deployments]}
            for a, d in rendered.decisions.items()
        }
        role = desired.roles[rendered.role].spec
        host = desired.host(self.settings.host)
        if isinstance(host.vars, MotokoVars) and role.proxy_config:
            key = self.resolver.value(host.vars.litellm_bearer_token.secret)
            self.gateway = (f"http://127.0.0.1:{host.vars.litellm_port}", key, role.proxy_config)
            self.rotation_step(previous, on_disk, rendered.stack.files[role.proxy_config].content)
        if isinstance(host.vars, GpuNodeVars) and role.drain:
            self.drained = frozenset(role.drain)
            self.drain_target = self._drain_target(desired, host.vars)
        return rendered, role.on_config_change, role.start_retries

    def proxy_config_on_disk(self, desired: DesiredState) -> str | None:
        """The gateway's proxy config as the last pass wrote it (``None``: not a gateway, or
        no readable file yet)."""
        host = desired.host(self.settings.host)
        config = desired.roles[host.role].spec.proxy_config
        if host.kind != "gateway" or config is None:
            return None
        path = self.store.stack_dir(project_name(host.name, self.settings.project_prefix)) / config
        try:
            return path.read_text(encoding="utf-8") if path.is_file() and not path.is_symlink() else None
        except (OSError, UnicodeDecodeError):
            return None

    def rotation_step(self, previous: str | None, on_disk: str | None, desired: str) -> None:
        """Which step of a bearer-token rotation this pass is, from the config on disk and the
        one rendered: the first (a new master key: both keys accepted until the next reload),
        the second (the same key, a key no longer accepted), or neither."""
        new = proxy.master_key(desired)
        accepted, accepted_before = proxy.accepted_digests(desired), proxy.accepted_digests(on_disk or "")
        if previous is not None and new is not None and previous != new:
            self.rotation = bearer.ROTATION_STARTED
        elif set(accepted_before) - set(accepted):
            self.rotation = bearer.ROTATION_FINISHED
        if accepted and accepted != accepted_before:
            self.generation = bearer.generation(list(accepted))

    def _drain_target(self, desired: DesiredState, v: GpuNodeVars) -> DrainTarget:
        """Where this host asks for a drain: the commit's motoko and this host's report token."""
        token = None
        if v.report_token is not None:
            try:
                token = self.resolver.value(v.report_token.secret)
            except AgentError as exc:  # no drain rather than no deploy: said, not fatal
                self.options.say(f"no drain: report token unavailable ({exc})")
        fleet = desired.fleet
        return DrainTarget(
            host=self.settings.host,
            motoko_url=self.settings.motoko_url or desired.motoko_url(),
            token=token,
            api_base=f"http://127.0.0.1:{v.published_port}/v1",
            served_name=v.served_name,
            policy=fleet.drain,
            deadline_s=fleet.drain.deadline(fleet.routing),
        )

    def observe(self, stack: StackSpec, stack_dir: Path) -> Observed:
        images = sorted({s.image for s in stack.services.values()})
        names = [container_name(stack, s) for s in stack.services]
        observed = with_reloads(
            self.engine.observe(stack.project, images, names), stack_dir, prune=not self.options.dry_run
        )
        # The files the containers mount are part of what runs: checked every pass.
        return observed.model_copy(update={"stack_dir": stack_on_disk(stack, stack_dir)})

    def quarantined(self, fp: str) -> bool:
        state = self.store.load()
        if fp not in state.quarantine or self.options.retry_quarantined:
            return False
        q = state.quarantine[fp]
        self.result.fail(
            Failure.QUARANTINED,
            f"desired state quarantined since commit {q.commit[:12]}: {q.reason}; "
            "push a change (or --retry) to try again",
        )
        return True

    def rollout(self, start_retries: dict[str, int]) -> Rollout:
        o = self.options
        return Rollout(
            host=self.settings.host,
            commit=self.result.commit,
            health_cap_s=o.health_cap_s,
            say=o.say,
            stopping=o.stopping,
            start_retries=start_retries,
            compose=self.compose,
            drained=self.drained,
            # The gateway's rolling reload is checked by finish_rolling_reloads (serving).
            checked_signals=frozenset({ROLLING_RELOAD}) if self.gateway is not None else frozenset(),
            drain=o.drain(self.drain_target) if o.drain is not None and self.drain_target is not None else None,
        )

    def rollout_failed(self, fp: str) -> None:
        applied = self.result.applied
        assert applied is not None
        self.result.fail(applied.failure or Failure.ENGINE, applied.error or "failed")
        # A new version that did not come up is not retried every pass: quarantined until the
        # desired state changes. Never the state already applied (that is drift healing).
        if applied.rollout_failed and fp != self.store.load().applied_fingerprint:
            reason = scrub(self.result.error or "failed", self.resolver.known_values())
            quarantine = Quarantined(commit=self.result.commit, reason=reason, at=now())
            self.store.update(lambda st: st.quarantine.__setitem__(fp, quarantine))

    def verify(self, stack: StackSpec, stack_dir: Path, policy: dict[str, str]) -> bool:
        """Observe again: converged means nothing is left to do."""
        observed = self.observe(stack, stack_dir)
        self.result.services = _services(stack, observed)
        # A network still in use by someone else is left (and retried next pass), not a failure.
        left = [a for a in plan(stack, observed, policy) if a.kind is not ActionKind.REMOVE_NETWORK]
        if pending(left):
            todo = "; ".join(str(a) for a in left if a.kind is not ActionKind.NOOP)
            self.result.fail(Failure.NOT_CONVERGED, f"did not converge: {todo}")
            return False
        self.result.result = PassOutcome.CONVERGED
        return True


def stack_on_disk(stack: StackSpec, stack_dir: Path) -> StackDir:
    """The mode and content of each desired stack file as it is on disk, hashed as the planner
    hashes the desired ones; None for one missing or unreadable (so it differs)."""
    return StackDir(path=str(stack_dir), files={path: _file_on_disk(stack_dir / path) for path in stack.files})


def _file_on_disk(path: Path) -> str | None:
    try:
        if not path.is_file() or path.is_symlink():
            return None
        content = path.read_bytes().decode("utf-8")
        mode = path.stat().st_mode & 0o777
    except (OSError, UnicodeDecodeError):
        return UNREADABLE
    return file_hashes([StackFile(path=path.name, content=content, mode=mode)])[path.name]


def _scrub_result(result: PassResult, values: list[str]) -> None:
    """No secret value in what the pass reports (container log lines are quoted in outcomes)."""
    if result.error:
        result.error = scrub(result.error, values)
    if result.applied is not None:
        for outcome in result.applied.outcomes:
            outcome.detail = scrub(outcome.detail, values)


def _services(stack: StackSpec, observed: Observed) -> dict[str, dict[str, str | None]]:
    out: dict[str, dict[str, str | None]] = {}
    for name in stack.services:
        mine = [c for c in observed.containers if c.owned and c.project == stack.project and c.service == name]
        c = next((c for c in mine if c.name == container_name(stack, name)), mine[0] if mine else None)
        out[name] = {
            "container": c.id[:12] if c else None,
            "container_name": container_name(stack, name),
            "state": c.state if c else "missing",
            "health": c.health if c else None,
            "commit": c.labels.get(L.COMMIT) if c else None,
        }
    return out


def _record(store: StateStore, result: PassResult, applied_fp: str | None) -> None:
    result.finished = now()
    run = Run(
        id=result.run_id,
        started=result.started,
        finished=result.finished,
        result=result.result,
        failure=result.failure,
        commit=result.commit,
        error=result.error,
        actions=[a.as_dict() for a in result.actions if a.kind is not ActionKind.NOOP],
    )

    def update(state: AgentState) -> None:
        state.host = result.host
        if applied_fp is not None:
            state.applied_commit = result.commit
            state.applied_fingerprint = applied_fp
            state.quarantine.pop(applied_fp, None)
        if result.role:
            state.role = result.role
        if result.services:
            state.services = result.services
        state.record(run)

    try:
        store.update(update)
    except (AgentError, OSError) as exc:
        log.warning("could not record the run", error=str(exc))
