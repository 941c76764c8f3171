"""``agent status`` for people (a plain table) and its exit code (0 healthy, 1 degraded, 3 not
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
    for svc in status.get("services") or []:
        name = svc.get("name")
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


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + fmt.format(*headers).rstrip(), *("  " + fmt.format(*r).rstrip() for r in rows)]


def show(status: dict[str, Any]) -> None:
    """Plain text (no rich: structlog imports it when present, which costs the daemon 6 MiB)."""
    code = exit_code(status)
    health = {0: "healthy", 1: "DEGRADED", 3: "NOT RUNNING"}[code]
    lines = [f"agent on {status.get('host')} (role {status.get('role') or '?'}): {health}"]
    if status.get("not_running"):
        lines.append(f"  {status['not_running']}")
    lines.append(f"  applied commit: {(status.get('applied_commit') or 'none')[:12]}")
    if status.get("source"):
        lines.append(
            f"  desired state:  {status['source'].get('repo')} at {(status.get('desired_commit') or '?')[:12]}"
        )
    last = status.get("last_run")
    if last:
        lines.append(f"  last run:       {last.get('result')} {_ago(last.get('time'))} (run {last.get('run_id')})")
    lines += [f"  ! {line}" for line in problems(status)]
    if status.get("state_reset"):
        lines.append(f"  note: {status['state_reset']}")
    services = status.get("services") or []
    if services:
        lines.append("")
        lines += _table(
            ("SERVICE", "CONTAINER", "STATE", "HEALTH"),
            [(s["name"], s.get("container") or "-", s.get("state") or "-", s.get("health") or "-") for s in services],
        )
    routing = status.get("routing") or {}
    if routing:
        lines.append("")
        lines += _table(
            ("ALIAS", "SERVED BY", "WHY"),
            [(a, r.get("backend", "-"), r.get("reason", "")) for a, r in sorted(routing.items())],
        )
    print("\n".join(lines))
