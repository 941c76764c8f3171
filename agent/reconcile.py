"""One reconcile pass: desired state -> render -> observe -> plan -> execute -> record.

Used by ``agent plan`` (dry run), ``agent apply`` (one pass) and the daemon (every interval).
Every pass observes afresh before it decides. A pass that had to roll back quarantines that
desired state (by fingerprint): it is not retried every pass, only once the desired state
changes (or with ``retry_quarantined``).
"""

from __future__ import annotations

import fcntl
import hashlib
import secrets as pysecrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.desired import load_desired
from agent.engine import Engine, EngineError
from agent.errors import AgentError, DesiredStateError
from agent.executor import ApplyResult, Executor, with_reloads
from agent.lint import lint_fleet, lint_stack
from agent.observed import Observed
from agent.plan import Action, container_name, pending, plan
from agent.render import RenderedStack, render_host
from agent.secrets import SecretResolver
from agent.settings import Settings
from agent.stack import StackSpec
from agent.state import Quarantined, Run, StateStore, now

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


@contextmanager
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
) -> PassResult:
    repo = repo or Path(settings.repo)
    commit = commit or repo_commit(repo)
    result = PassResult(host=settings.host, commit=commit)
    if run_id:
        result.run_id = run_id
    store = StateStore(settings.state_dir)
    started = result.started = now()
    try:
        desired = load_desired(repo)
        resolver = SecretResolver.for_repo(repo, settings.secrets_file, settings.identity_file, on_secret)
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
        observed = with_reloads(engine.observe(stack.project, images, names), stack_dir)
        result.actions = plan(stack, observed, policy)
        result.services = _services(stack, observed)
        if not pending(result.actions):
            result.result = "converged"
        elif dry_run:
            result.result = "changes-pending"
        if dry_run or not pending(result.actions):
            if not dry_run:
                _record(store, result, started, fingerprint(rendered))
            return result

        fp = fingerprint(rendered)
        state = store.load()
        if fp in state.quarantine and not retry_quarantined:
            q = state.quarantine[fp]
            result.error = (
                f"desired state quarantined since commit {q.commit}: {q.reason}; "
                "push a change (or --retry) to try again"
            )
            _record(store, result, started, None)
            return result
        with pass_lock(settings.state_dir):
            executor = Executor(engine, stack_dir, settings.host, commit, health_cap_s, say)
            result.applied = executor.apply(stack, result.actions)
        if result.applied.ok:
            # Verify: observe again; converged means nothing is left to do.
            observed = with_reloads(engine.observe(stack.project, images, names), stack_dir)
            result.services = _services(stack, observed)
            after = plan(stack, observed, policy)
            if pending(after):
                result.error = "did not converge: " + "; ".join(str(a) for a in after if a.kind != "noop")
            else:
                result.result = "converged"
        else:
            result.error = result.applied.error
            if result.applied.rolled_back:
                state = store.load()
                state.quarantine[fp] = Quarantined(commit=commit, reason=result.error or "failed", at=now())
                store.save(state)
        _record(store, result, started, fp if result.result == "converged" else None)
    except (DesiredStateError, EngineError, AgentError) as exc:
        result.error = str(exc)
        _record(store, result, started, None)
    return result


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


def _record(store: StateStore, result: PassResult, started: float, applied_fp: str | None) -> None:
    result.finished = now()
    try:
        state = store.load()
        if applied_fp is not None:
            state.applied_commit = result.commit
            state.applied_fingerprint = applied_fp
        state.record(
            Run(
                id=result.run_id,
                started=started,
                finished=now(),
                result=result.result,
                commit=result.commit,
                error=result.error,
                actions=[a.as_dict() for a in result.actions if a.kind != "noop"],
            )
        )
        store.save(state)
    except (AgentError, OSError) as exc:
        log.warning("could not record the run", error=str(exc))
