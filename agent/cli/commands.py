"""The ``agent`` command line (contract section 3). Thin: parse, call the core, print.

Exit codes: 0 ok; 1 invalid/failed; 2 changes pending (``plan``); 3 agent not running
(``status``). Errors the user can cause print ``file:line: what`` and never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.core.errors import AgentError, ConfigError, DesiredStateError, Problem
from agent.node.settings import Settings, load_settings

if TYPE_CHECKING:
    from agent.node.drain import DrainTarget, FleetDrain


def _parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one declaration per flag reads best
    p = argparse.ArgumentParser(prog="agent", description="Pull-based deployment agent for a self-hosted LLM fleet.")
    p.add_argument("--version", action="version", version=f"agent {__version__}")
    p.add_argument("--config", type=Path, help="agent TOML config (default /etc/llm-agent/agent.toml)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, host: bool) -> None:
        sp.add_argument(
            "--repo", help="desired-state repository: a path or a git URL; default $AGENT_REPO or ./desired_state"
        )
        sp.add_argument("--branch", help="branch of a git repository (default main)")
        if host:
            sp.add_argument("--host", help="host to act for; default $AGENT_HOST or this machine's hostname")
        sp.add_argument("--prefix", dest="project_prefix", help="compose project / container name prefix")
        sp.add_argument("--secrets-file", type=Path, help="host-local secrets YAML (name: value, 0600)")
        sp.add_argument("--identity", dest="identity_file", type=Path, help="age identity for secrets/*.age")

    v = sub.add_parser("validate", help="validate the whole desired state (every host)")
    common(v, host=False)
    v.add_argument("--json", action="store_true")
    r = sub.add_parser("render", help="write a host's rendered stack to a directory")
    common(r, host=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--reveal-secrets", action="store_true", help="write secret values into the 0600 secret files")
    pl = sub.add_parser("plan", help="what apply would do against the live engine, with reasons (no change made)")
    common(pl, host=True)
    pl.add_argument("--json", action="store_true")
    pl.add_argument(
        "--state-dir", type=Path, help="state directory whose stack files are compared (default as for apply)"
    )
    ap = sub.add_parser("apply", help="one reconcile pass now, then exit")
    common(ap, host=True)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--state-dir", type=Path, help="state directory (default $AGENT_STATE_DIR or /var/lib/llm-agent)")
    ap.add_argument("--retry", action="store_true", help="retry a quarantined desired state")
    ap.add_argument("--force", action="store_true", help="apply even while the agent is paused")
    ap.add_argument(
        "--no-drain",
        action="store_true",
        help="on a GPU host: replace the backend without draining it from the gateway first",
    )
    ap.add_argument(
        "--health-timeout",
        type=_health_seconds,
        help="cap, in seconds (at least 1), on waiting for a service to be healthy",
    )

    def state_dir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--state-dir", type=Path, help="state directory (default $AGENT_STATE_DIR or /var/lib/llm-agent)"
        )

    rn = sub.add_parser("run", help="the daemon (what agent.service starts)")
    common(rn, host=True)
    state_dir(rn)
    rn.add_argument("--interval", type=float, help="seconds between passes (default 30)")
    rn.add_argument("--splay", type=float, help="random extra delay, seconds (default 5)")
    st = sub.add_parser("status", help="the local agent's state (exit 0 healthy, 1 degraded, 3 not running)")
    state_dir(st)
    st.add_argument("--json", action="store_true")
    for name, text in (
        ("trigger", "ask the running daemon to pull and reconcile now"),
        ("resume", "apply changes again"),
    ):
        state_dir(sub.add_parser(name, help=text))
    pa = sub.add_parser("pause", help="stop applying changes (persisted; shown in status)")
    state_dir(pa)
    pa.add_argument("--reason", required=True)
    kg = sub.add_parser("keygen", help="create this host's age identity (0600) and print its public key")
    kg.add_argument("--out", type=Path, default=Path("/etc/llm-agent/identity.txt"))
    sc = sub.add_parser("secret", help="manage encrypted secrets in the desired-state repository")
    scs = sc.add_subparsers(dest="secret_command", required=True, metavar="SUBCOMMAND")
    enc = scs.add_parser("encrypt", help="encrypt a value (read from stdin) to secrets/NAME.age")
    enc.add_argument("name")
    enc.add_argument("--repo", help="desired-state repository (default ./desired_state)")
    enc.add_argument("--recipients", type=Path, help="public keys, one per line (default secrets/recipients.txt)")
    # `agent run --config FILE` (as agent.service runs it) as well as `agent --config FILE run`.
    for sp in (*sub.choices.values(), *scs.choices.values()):
        sp.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="agent TOML config")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


#: Below this a healthy service cannot pass its first check: the pass would roll back a good version.
MIN_HEALTH_TIMEOUT_S = 1.0


def _health_seconds(text: str) -> float:
    """``--health-timeout``: a finite number of seconds, at least ``MIN_HEALTH_TIMEOUT_S``.
    Raises ``ConfigError`` (not argparse's usage dump): ``main`` prints it as one line, exit 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= MIN_HEALTH_TIMEOUT_S):
        raise ConfigError(f"--health-timeout {text}: must be a number of seconds, at least {MIN_HEALTH_TIMEOUT_S:g}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except AgentError as exc:  # a flag refused by its own check (argparse only maps ValueError)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command != "run":
        from agent.daemon import logs

        logs.configure(stream=sys.stderr, level="warning")  # stdout stays clean for --json
    try:
        settings = _settings(args)
        handler = {
            "validate": cmd_validate,
            "render": cmd_render,
            "plan": cmd_plan,
            "apply": cmd_apply,
            "run": cmd_run,
            "status": cmd_status,
            "trigger": cmd_trigger,
            "pause": cmd_pause,
            "resume": cmd_resume,
            "keygen": cmd_keygen,
            "secret": cmd_secret,
        }[args.command]
        return handler(args, settings)
    except DesiredStateError as exc:
        _print_problems(exc.problems)
        return 1
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    except Exception as exc:  # a bug or an unmapped library error: one line with its cause
        if args.debug:
            raise
        from agent.daemon.logs import error_line

        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1


def _settings(args: argparse.Namespace) -> Settings:
    keys = (
        "repo",
        "branch",
        "host",
        "project_prefix",
        "secrets_file",
        "identity_file",
        "state_dir",
        "interval",
        "splay",
    )
    return load_settings(args.config, **{k: getattr(args, k, None) for k in keys})


def _resolver(settings: Settings, repo: Path) -> Any:
    from agent.adapters.secrets import SecretResolver

    return SecretResolver.for_repo(repo, settings.secrets_file, settings.identity_file)


@contextlib.contextmanager
def _checkout(settings: Settings, deploys: bool = False) -> Iterator[tuple[Path, str | None]]:
    """The desired-state tree to act on. A plain directory, or a git *working tree* (it has a
    ``.git`` entry), is read as it is on disk: the edit the operator is looking at, named
    ``<sha>+dirty``. URLs and bare repositories are fetched: a snapshot of the branch head (in
    a throwaway cache; signatures checked if required, which an ``apply`` from a working tree
    also goes through, since files on disk carry no signature)."""
    from agent.adapters.gitsource import GitSource, tree_commit

    local = Path(settings.repo)
    work_tree = _is_work_tree(local) and not (deploys and settings.require_signed_commits)
    if work_tree or not GitSource.is_git_url(settings.repo):
        path = local / settings.repo_subdir if work_tree and settings.repo_subdir else local
        yield path, tree_commit(path) if work_tree else None
        return
    with tempfile.TemporaryDirectory(prefix="llm-agent-") as tmp:
        source = GitSource(
            settings.repo,
            settings.branch,
            Path(tmp),
            subdir=settings.repo_subdir,
            require_signed=settings.require_signed_commits,
            allowed_signers=settings.allowed_signers,
            gpg_home=settings.gpg_home,
        )
        snap = source.snapshot(source.fetch())
        yield snap.path, snap.commit


def _is_work_tree(path: Path) -> bool:
    try:
        return path.is_dir() and os.path.lexists(path / ".git")
    except OSError:
        return False


def _print_problems(problems: list[Problem], stream: Any = None) -> None:
    stream = stream or sys.stderr
    for problem in problems:
        print(problem, file=stream)


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from agent.desired.validate import validate_all

    with _checkout(settings) as (repo, _commit):
        resolver = _resolver(settings, repo)
        desired, problems = validate_all(repo, resolver, settings.project_prefix)
        problems += resolver.identity_problems()
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    if args.json:
        print(
            json.dumps(
                {
                    "valid": not errors,
                    "hosts": sorted(desired.hosts) if desired else [],
                    "problems": [
                        {"file": p.file, "line": p.line, "severity": p.severity, "message": p.message} for p in problems
                    ],
                },
                indent=2,
            )
        )
    else:
        _print_problems(problems, sys.stdout)
        if errors:
            print(f"invalid: {len(errors)} error(s), {len(warnings)} warning(s)", file=sys.stderr)
        else:
            hosts = ", ".join(sorted(desired.hosts)) if desired else ""
            print(f"valid: {len(desired.hosts) if desired else 0} hosts ({hosts}), {len(warnings)} warning(s)")
    return 1 if errors else 0


def cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    from agent.desired.load import load_desired
    from agent.desired.render import render_host

    with _checkout(settings) as (repo, _commit):
        desired = load_desired(repo)
        rendered = render_host(
            desired,
            settings.host,
            _resolver(settings, repo),
            reveal=args.reveal_secrets,
            prefix=settings.project_prefix,
        )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written = [_write(out / "compose.yaml", rendered.compose, 0o644)]
    for f in rendered.stack.files.values():
        written.append(_write(out / f.path, f.content, f.mode))
    for path in written:
        print(path)
    if not args.reveal_secrets:
        print("secrets are redacted; --reveal-secrets writes their values into the 0600 secret files", file=sys.stderr)
    return 0


def _write(path: Path, content: str, mode: int) -> Path:
    from agent.adapters.fs import write_atomic

    write_atomic(path, content.encode(), mode)
    return path


def _drain_for(say: Callable[[str], None]) -> Callable[[DrainTarget], FleetDrain]:
    """``agent apply`` on a GPU host drains its backend first, as the daemon does."""
    from agent.adapters.fleetclient import HttpxDrains
    from agent.node.drain import DrainHooks, FleetDrain

    def drain(target: DrainTarget) -> FleetDrain:
        return FleetDrain(target, HttpxDrains(), hooks=DrainHooks(say=say))

    return drain


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from agent.adapters.engine import DockerEngine
    from agent.node.reconcile import PassOptions, reconcile_once

    with DockerEngine() as engine, _checkout(settings) as (repo, commit):
        result = reconcile_once(settings, engine, repo, commit, PassOptions(dry_run=True))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        if result.project:
            print(f"host {result.host}, project {result.project}, desired commit {result.commit}")
        for action in result.actions:
            print(f"  {action}")
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    return 2 if result.result == "changes-pending" else 0


def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    from agent.adapters.engine import DockerEngine
    from agent.node.reconcile import PassOptions, reconcile_once
    from agent.node.state import StateStore

    paused = StateStore(settings.state_dir).load().paused
    if paused and not args.force:
        print(f"error: the agent is paused ({paused.reason}); `agent resume`, or apply --force", file=sys.stderr)
        return 1

    def say(message: str) -> None:
        if not args.json:
            print(f"  .. {message}", flush=True)

    with DockerEngine() as engine, _checkout(settings, deploys=True) as (repo, commit):
        options = PassOptions(
            retry_quarantined=args.retry,
            health_cap_s=args.health_timeout,
            say=say,
            drain=None if args.no_drain else _drain_for(say),
        )
        result = reconcile_once(settings, engine, repo, commit, options)
        if result.follow_up and result.result == "converged":
            # A rotation's second step (the old key retired), as the daemon runs it: at once.
            say(result.follow_up)
            first = [a for a in result.actions if a.kind != "noop"]
            result = reconcile_once(settings, engine, repo, commit, options)
            result.actions = first + result.actions
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for action in result.actions:
            if action.kind != "noop":
                print(f"  {action}")
        if result.applied and result.applied.rolled_back:
            print("rolled back: the previous containers are serving", file=sys.stderr)
        if result.error:
            print(f"failed: {result.error}", file=sys.stderr)
        else:
            print(f"converged: host {result.host}, project {result.project}, commit {result.commit}")
    return 0 if result.result == "converged" else 1


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from agent.daemon import logs
    from agent.daemon.service import Daemon

    redactor = logs.configure(level=settings.log_level)
    return Daemon(settings, redactor).run()


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from agent.daemon.control import ControlClient, NotRunning
    from agent.daemon.service import status_from_state
    from agent.daemon.status import exit_code, show
    from agent.node.state import StateStore

    try:
        status = ControlClient(settings.socket_path).get("/status").json()
    except NotRunning as exc:
        status = status_from_state(settings, StateStore(settings.state_dir).load())
        status["not_running"] = str(exc)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        show(status)
    return exit_code(status)


def _control(settings: Settings, route: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    from agent.daemon.control import ControlClient

    return ControlClient(settings.socket_path).post(route, body)


def cmd_trigger(args: argparse.Namespace, settings: Settings) -> int:
    out = _control(settings, "/trigger")
    print("triggered" + (f" ({out['note']})" if out.get("note") else ""))
    return 0


def cmd_pause(args: argparse.Namespace, settings: Settings) -> int:
    return _set_pause(settings, args.reason)


def cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    return _set_pause(settings, None)


def _set_pause(settings: Settings, reason: str | None) -> int:
    """Through the daemon when it runs (a resume then triggers a pass), else in the state file."""
    from agent.daemon.control import NotRunning
    from agent.daemon.service import set_pause
    from agent.node.state import StateStore

    if reason is not None and not reason.strip():
        print("error: a reason is required", file=sys.stderr)
        return 1
    try:
        _control(settings, "/pause" if reason else "/resume", {"reason": reason} if reason else None)
        note = ""
    except NotRunning:
        set_pause(StateStore(settings.state_dir), reason)
        note = " (agent not running; recorded for its next start)"
    print((f"paused: {reason}" if reason else "resumed") + note)
    return 0


def cmd_keygen(args: argparse.Namespace, settings: Settings) -> int:
    from agent.adapters.secrets import keygen

    recipient = keygen(args.out)
    print(f"identity written to {args.out} (mode 0600)")
    print(f"public key (add it to secrets/recipients.txt): {recipient}")
    return 0


def cmd_secret(args: argparse.Namespace, settings: Settings) -> int:
    from agent.adapters.secrets import encrypt_secret

    value = sys.stdin.read().rstrip("\n")
    path = encrypt_secret(Path(settings.repo), args.name, value, args.recipients)
    print(f"wrote {path}: commit and push it to deploy")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
