"""``agent status`` for people (a rich table) and its exit code (0 healthy, 1 degraded, 3 not
running). The ``--json`` form is the daemon's status document as it is."""

from __future__ import annotations

import time
from typing import Any


def problems(status: dict[str, Any]) -> list[str]:
    out = []
    last = status.get("last_run")
    if last and last.get("result") != "converged":
        out.append(f"last run {last.get('result')}: {last.get('error') or ''}".strip())
    if status.get("paused"):
        out.append(f"paused: {status['paused']['reason']}")
    source = status.get("source") or {}
    if source.get("error"):
        out.append(f"desired-state source: {source['error']}")
    for name, svc in (status.get("services") or {}).items():
        if svc.get("state") != "running" or svc.get("health") == "unhealthy":
            out.append(f"service {name}: {svc.get('state')}{' (' + svc['health'] + ')' if svc.get('health') else ''}")
    return out


def exit_code(status: dict[str, Any]) -> int:
    if not status.get("running"):
        return 3
    return 1 if problems(status) else 0


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = int(time.time() - ts)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago"


def show(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    state = "running" if status.get("running") else "NOT RUNNING"
    health = {0: "[green]healthy[/]", 1: "[yellow]degraded[/]", 3: "[red]not running[/]"}[exit_code(status)]
    console.print(
        f"[bold]agent[/] on [bold]{status.get('host')}[/] (role {status.get('role') or '?'}): {state}, {health}"
    )
    if status.get("not_running"):
        console.print(f"  {status['not_running']}")
    console.print(f"  applied commit: {(status.get('applied_commit') or 'none')[:12]}")
    if status.get("source"):
        console.print(
            f"  desired state:  {status['source'].get('repo')} at {(status.get('desired_commit') or '?')[:12]}"
        )
    last = status.get("last_run")
    if last:
        console.print(f"  last run:       {last.get('result')} {_ago(last.get('time'))} (run {last.get('run_id')})")
    for line in problems(status):
        console.print(f"  [yellow]! {line}[/]")
    services = status.get("services") or {}
    if services:
        table = Table("service", "container", "state", "health", box=None, pad_edge=False)
        for name, svc in sorted(services.items()):
            table.add_row(name, svc.get("container") or "-", svc.get("state") or "-", svc.get("health") or "-")
        console.print(table)
    routing = status.get("routing") or {}
    if routing:
        table = Table("alias", "served by", "why", box=None, pad_edge=False)
        for alias, r in sorted(routing.items()):
            table.add_row(alias, r.get("backend", "-"), r.get("reason", ""))
        console.print(table)
