"""One reconcile pass: desired state -> render -> observe -> plan -> execute -> record.

Used by ``agent plan`` (dry run), ``agent apply`` (one pass) and the daemon (every interval).
Every pass observes afresh before it decides. A pass that had to roll back quarantines that
desired state (by fingerprint): it is not retried every pass, only once the desired state
changes (or with ``retry_quarantined``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import secrets as pysecrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.adapters.engine import Engine, EngineError
from agent.adapters.secrets import REDACTED, SecretResolver
from agent.core.errors import AgentError, DesiredStateError
from agent.core.lint import lint_fleet, lint_stack
from agent.core.observed import Observed
from agent.core.plan import Action, container_name, pending, plan
from agent.core.stack import StackSpec
from agent.desired.load import load_desired
from agent.desired.render import RenderedStack, render_host
from agent.node.executor import ApplyResult, Executor, with_reloads
from agent.node.settings import Settings
from agent.node.state import AgentState, Quarantined, Run, StateStore, now

log = structlog.get_logger("agent.reconcile")


@dataclass
class PassResult:
    host: str
    project: str = ""
    commit: str = ""
    result: str = "failed"  # converged | changes-pending | failed
    error: str | None = None
    actions: list[Action] = field(default_factory=list)
    applied: ApplyResult | None = None
    run_id: str = field(default_factory=lambda: pysecrets.token_hex(4))
    role: str = ""
    #: service -> {container, state, health}, as last observed in this pass
    services: dict[str, dict[str, str | None]] = field(default_factory=dict)
    #: on motoko: alias -> {backend, reason} in effect
    routing: dict[str, dict[str, str]] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "run_id": self.run_id,
            "host": self.host,
            "project": self.project,
            "commit": self.commit,
            "result": self.result,
            "error": self.error,
            "role": self.role,
            "started": self.started,
            "finished": self.finished,
            "actions": [a.as_dict() for a in self.actions],
            "services": self.services,
            "routing": self.routing,
        }
        if self.applied is not None:
            out["outcomes"] = [o.as_dict() for o in self.applied.outcomes]
            out["rolled_back"] = self.applied.rolled_back
        return out


def fingerprint(rendered: RenderedStack) -> str:
    """Identity of a desired stack (secret values only as part of a hash)."""
    return hashlib.sha256(rendered.stack.model_dump_json().encode()).hexdigest()[:16]


def repo_commit(repo: Path) -> str:
    """The commit a local desired-state tree comes from, ``+dirty`` if it has edits."""
    try:
        import git

        r = git.Repo(repo, search_parent_directories=True)
        sha = r.head.commit.hexsha[:12]
        rel = str(Path(repo).resolve().relative_to(Path(r.working_tree_dir or ".").resolve()))
        dirty = r.is_dirty(untracked_files=True, path=None if rel == "." else rel)
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "local"


@contextlib.contextmanager
def pass_lock(state_dir: Path) -> Iterator[None]:
    """One pass at a time per host; released by the kernel if the process dies."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(state_dir / "pass.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentError(f"another pass is running on this host (lock {state_dir / 'pass.lock'})") from None
        yield


def reconcile_once(
    settings: Settings,
    engine: Engine,
    *,
    repo: Path | None = None,
    commit: str | None = None,
    dry_run: bool = False,
    retry_quarantined: bool = False,
    health_cap_s: float | None = None,
    say: Callable[[str], None] = lambda msg: None,
    on_secret: Callable[[str], None] | None = None,
    run_id: str | None = None,
    stopping: Callable[[], bool] = lambda: False,
    record: bool = True,
) -> PassResult:
    """One pass. A dry run (``agent plan``) reads only: it records nothing and writes nothing.
    ``record=False`` applies without recording the run (the daemon healing on its last good
    commit while the branch head is refused)."""
    repo = repo or Path(settings.repo)
    commit = commit or repo_commit(repo)
    result = PassResult(host=settings.host, commit=commit)
    if run_id:
        result.run_id = run_id
    store = StateStore(settings.state_dir)
    result.started = now()
    resolver = SecretResolver.for_repo(repo, settings.secrets_file, settings.identity_file, on_secret)
    applied_fp: str | None = None
    try:
        # A dry run takes no lock: it must not wait for, or block, a real pass.
        with contextlib.nullcontext() if dry_run else pass_lock(settings.state_dir):
            applied_fp = _pass(
                settings,
                engine,
                repo,
                commit,
                store,
                resolver,
                result,
                dry_run,
                retry_quarantined,
                health_cap_s,
                say,
                stopping,
            )
    except (DesiredStateError, EngineError, AgentError) as exc:
        result.error = str(exc)
    except OSError as exc:  # the state dir: disk full, permissions
        result.error = f"{exc.filename or 'state dir'}: {exc.strerror}"
    if result.error:
        result.error = _scrub(result.error, resolver.known_values())
    if result.applied is not None:  # container log lines quoted in outcomes, too
        for outcome in result.applied.outcomes:
            outcome.detail = _scrub(outcome.detail, resolver.known_values())
    if record and not dry_run:
        _record(store, result, applied_fp)
    return result


def _pass(
    settings: Settings,
    engine: Engine,
    repo: Path,
    commit: str,
    store: StateStore,
    resolver: SecretResolver,
    result: PassResult,
    dry_run: bool,
    retry_quarantined: bool,
    health_cap_s: float | None,
    say: Callable[[str], None],
    stopping: Callable[[], bool],
) -> str | None:
    """Render, observe, plan, maybe apply; fills ``result``. Returns the fingerprint applied."""
    desired = load_desired(repo)
    rendered = render_host(desired, settings.host, resolver, reveal=True, prefix=settings.project_prefix)
    # What LiteLLM would silently accept (or die on at SIGHUP) never reaches the host.
    errors = [p for p in lint_fleet(desired) + lint_stack(desired, rendered) if p.severity == "error"]
    if errors:
        raise DesiredStateError(errors)
    stack = rendered.stack
    result.project = stack.project
    result.role = rendered.role
    result.routing = {a: {"backend": d.backend.name, "reason": d.reason} for a, d in rendered.decisions.items()}
    policy = desired.roles[rendered.role].spec.on_config_change
    images = sorted({s.image for s in stack.services.values()})
    names = [container_name(stack, s) for s in stack.services]
    stack_dir = store.stack_dir(stack.project)
    fp = fingerprint(rendered)

    def look() -> Observed:
        return with_reloads(engine.observe(stack.project, images, names), stack_dir, prune=not dry_run)

    observed = look()
    result.actions = plan(stack, observed, policy)
    result.services = _services(stack, observed)
    if not pending(result.actions):
        result.result = "converged"
        return fp
    if dry_run:
        result.result = "changes-pending"
        return None

    state = store.load()
    if fp in state.quarantine and not retry_quarantined:
        q = state.quarantine[fp]
        result.error = (
            f"desired state quarantined since commit {q.commit[:12]}: {q.reason}; "
            "push a change (or --retry) to try again"
        )
        return None
    role = desired.roles[rendered.role].spec
    executor = Executor(
        engine, stack_dir, settings.host, commit, health_cap_s, say, stopping, start_retries=role.start_retries
    )
    result.applied = executor.apply(stack, result.actions, observed.images)
    if not result.applied.ok:
        result.error = result.applied.error
        # A new version that did not come up is not retried every pass: quarantined until the
        # desired state changes. Never the state already applied (that is drift healing).
        if result.applied.rollout_failed and fp != state.applied_fingerprint:
            reason = _scrub(result.error or "failed", resolver.known_values())
            store.update(lambda st: st.quarantine.__setitem__(fp, Quarantined(commit=commit, reason=reason, at=now())))
        return None
    # Verify: observe again; converged means nothing is left to do.
    observed = look()
    result.services = _services(stack, observed)
    # A network still in use by someone else is left (and retried next pass), not a failure.
    after = [a for a in plan(stack, observed, policy) if a.kind != "remove_network"]
    if pending(after):
        result.error = "did not converge: " + "; ".join(str(a) for a in after if a.kind != "noop")
        return None
    result.result = "converged"
    return fp


def _scrub(text: str, values: list[str]) -> str:
    for value in values:
        if len(value) >= 4:
            text = text.replace(value, REDACTED)
    return text


def _services(stack: StackSpec, observed: Observed) -> dict[str, dict[str, str | None]]:
    out: dict[str, dict[str, str | None]] = {}
    for name in stack.services:
        mine = [c for c in observed.containers if c.owned and c.project == stack.project and c.service == name]
        c = next((c for c in mine if c.name == container_name(stack, name)), mine[0] if mine else None)
        out[name] = {
            "container": c.id[:12] if c else None,
            "state": c.state if c else "missing",
            "health": c.health if c else None,
        }
    return out


def _record(store: StateStore, result: PassResult, applied_fp: str | None) -> None:
    result.finished = now()
    run = Run(
        id=result.run_id,
        started=result.started,
        finished=result.finished,
        result=result.result,
        commit=result.commit,
        error=result.error,
        actions=[a.as_dict() for a in result.actions if a.kind != "noop"],
    )

    def update(state: AgentState) -> None:
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
