"""``agent status`` for people (plain tables) and its exit code (0 healthy, 1 degraded, 3 not
running). The ``--json`` form is the daemon's status document as it is.

Degraded: the last run did not converge, the agent is paused, the desired-state source fails,
a service is not running or unhealthy; on motoko also a backend out of routing, a host whose
report is stale (over three report intervals) or that never reported; on a gpu_node its
backend not ready, or its reports to motoko failing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from agent.core.controller import STALE_AFTER_INTERVALS

#: Routing events shown, newest first.
MAX_EVENTS_SHOWN = 10


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
    return out + _fleet_problems(status) + _backend_problems(status.get("backend"))


def _fleet_problems(status: dict[str, Any]) -> list[str]:
    """Motoko: hosts that never reported or whose report is stale, backends out of routing."""
    out = []
    for h in _hosts(status):
        if not h.get("reported"):
            out.append(f"host {h.get('host')} never reported")
        elif _stale(h, status):
            out.append(f"host {h.get('host')} report stale ({_age(h.get('age_s'))} old)")
        if h.get("problem"):
            out.append(f"host {h.get('host')}: {h['problem']}")
    backends = (status.get("routing_state") or {}).get("backends") or {}
    for name, b in sorted(backends.items()):
        if not b.get("in_routing", True):
            out.append(f"backend {name} out of routing: {b.get('why') or 'out'}")
    return out


def _backend_problems(backend: dict[str, Any] | None) -> list[str]:
    """A gpu_node: its backend not ready, its reports not delivered."""
    if not backend:
        return []
    out = []
    if backend.get("stage") != "ready":
        out.append(f"backend not ready ({backend.get('stage')}): {backend.get('backend') or 'not probed yet'}")
    last = (backend.get("reporting") or {}).get("last")
    if last is not None and not _delivered(last):
        out.append(f"reports to motoko failing: {last.get('detail') or last.get('status')}")
    return out


def _delivered(last: dict[str, Any]) -> bool:
    if "ok" in last:
        return bool(last["ok"])
    status = last.get("status")
    return isinstance(status, int) and 200 <= status < 300


def _hosts(status: dict[str, Any]) -> list[dict[str, Any]]:
    fleet = status.get("fleet")
    return [h for h in fleet if isinstance(h, dict)] if isinstance(fleet, list) else []


def _stale(host: dict[str, Any], status: dict[str, Any]) -> bool:
    if "stale" in host:
        return bool(host["stale"])
    interval = float(status.get("report_interval_s") or 10.0)
    return float(host.get("age_s") or 0.0) > STALE_AFTER_INTERVALS * interval


def exit_code(status: dict[str, Any]) -> int:
    if not status.get("running"):
        return 3
    return 1 if problems(status) else 0


# ---------------------------------------------------------------------- formatting


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    return f"{_age(time.time() - ts)} ago"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = max(0, int(seconds))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _cut(text: Any, width: int = 48) -> str:
    s = "-" if text is None or text == "" else str(text)
    return s if len(s) <= width else s[: width - 3] + "..."


def _num(value: Any) -> str:
    if value is None:
        return "?"
    f = float(value)
    return str(int(f)) if f.is_integer() else f"{f:g}"


def _load(load: dict[str, Any] | None) -> str:
    """``running/waiting`` requests."""
    if not load or (load.get("running") is None and load.get("waiting") is None):
        return "-"
    return f"{_num(load.get('running'))}/{_num(load.get('waiting'))}"


def _table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + fmt.format(*headers).rstrip(), *("  " + fmt.format(*r).rstrip() for r in rows)]


def _section(title: str, body: list[str]) -> list[str]:
    return ["", title, *body] if body else []


def _fleet_lines(status: dict[str, Any]) -> list[str]:
    rows = []
    for h in _hosts(status):
        if not h.get("reported"):
            rows.append((h.get("host") or "?", "-", "-", "never", "-", "-", "-", "-"))
            continue
        age = _age(h.get("age_s")) + (" STALE" if _stale(h, status) else "")
        rows.append(
            (
                h.get("host") or "?",
                h.get("role") or "-",
                (h.get("commit") or "-")[:12],
                age,
                h.get("stage") or "-",
                _cut(h.get("health"), 40),
                _cut(h.get("gpu"), 40),
                _load(h.get("load")),
            )
        )
    if not rows:
        return []
    api = f" (API {status['fleet_api']})" if status.get("fleet_api") else ""
    table = _table(("HOST", "ROLE", "COMMIT", "REPORT", "STAGE", "HEALTH", "GPU", "LOAD"), rows)
    return _section(f"fleet{api}:", table)


def _routing_lines(status: dict[str, Any]) -> list[str]:
    routing = status.get("routing") or {}
    if not routing:
        return []
    backends = (status.get("routing_state") or {}).get("backends") or {}

    def state(name: str) -> str:
        b = backends.get(name)
        if b is None:
            return name  # not probed by this agent (paid models, embeddings)
        return f"{name} (in)" if b.get("in_routing", True) else f"{name} (OUT)"

    rows = [
        (alias, " > ".join(state(n) for n in r.get("chain") or [r.get("backend", "-")]), _cut(r.get("reason"), 90))
        for alias, r in sorted(routing.items())
    ]
    lines = _section("routing in effect:", _table(("ALIAS", "DEPLOYMENTS, IN ORDER", "WHY"), rows))
    if backends:
        lines.append("")
        lines += _table(
            ("BACKEND", "STATE", "SINCE", "WHY", "PROBE", "LOAD"),
            [
                (
                    name,
                    "in" if b.get("in_routing", True) else "OUT",
                    _ago(b.get("since")) if b.get("since") else "-",
                    _cut(b.get("why"), 50),
                    _cut(b.get("probe"), 40),
                    _load(b.get("load")),
                )
                for name, b in sorted(backends.items())
            ],
        )
    return lines


def _spend_lines(status: dict[str, Any]) -> list[str]:
    spend = status.get("spend")
    if not spend:
        return []
    budget = spend.get("budget_usd")
    spent = spend.get("spent_usd")
    period = spend.get("period") or "1mo"
    if spent is None:
        return ["", f"OpenAI spend: unknown (the proxy did not answer); budget {_num(budget)} USD per {period}"]
    pct = f" ({100 * spent / budget:.0f}%)" if budget else ""
    over = "; OVER BUDGET: openai/* served by the budget fallback" if budget is not None and spent >= budget else ""
    reset = f", resets {spend['reset_at']}" if spend.get("reset_at") else ""
    return ["", f"OpenAI spend: {spent:.2f} of {_num(budget)} USD{pct} per {period}{reset}{over}"]


def _rollout_lines(status: dict[str, Any]) -> list[str]:
    """Motoko: the drain leases held (who is draining or loading) and the hosts waiting."""
    drains = status.get("drains") or {}
    rows = [
        (
            lease.get("host") or "?",
            ", ".join(lease.get("backends") or []) or "-",
            lease.get("state") or "?",
            f"{_num(lease.get('expires_in_s'))} s",
            _cut(lease.get("reason"), 60),
        )
        for lease in drains.get("leases") or []
    ]
    rows += [
        (w.get("host") or "?", "-", f"waiting {_num(w.get('waiting_s'))} s", "-", _cut(w.get("why"), 60))
        for w in drains.get("waiting") or []
    ]
    if not rows:
        return []
    return _section("rollout (drain leases):", _table(("HOST", "BACKENDS", "STATE", "EXPIRES", "WHY"), rows))


def _event_lines(status: dict[str, Any]) -> list[str]:
    events = ((status.get("routing_state") or {}).get("events") or [])[:MAX_EVENTS_SHOWN]
    rows = [
        (_ago(e.get("at")), e.get("backend") or "?", e.get("change") or "?", _cut(e.get("why"), 70)) for e in events
    ]
    return (
        _section("routing events (newest first):", _table(("WHEN", "BACKEND", "CHANGE", "WHY"), rows)) if rows else []
    )


def _backend_lines(backend: dict[str, Any] | None) -> list[str]:
    """A gpu_node's own backend and its reports to motoko."""
    if not backend:
        return []
    lines = [
        "",
        "backend:",
        f"  stage:     {backend.get('stage')}",
        f"  health:    {backend.get('backend') or 'not probed yet'}",
        f"  load:      {_load(backend.get('load'))} (running/waiting)",
        f"  gpu:       {backend.get('gpu') or 'unknown'}",
    ]
    drain = backend.get("drain")
    if drain and drain.get("stage") not in (None, "idle"):
        lines.append(f"  drain:     {drain.get('stage')} since {_ago(drain.get('since'))}: {drain.get('detail')}")
    rep = backend.get("reporting")
    if rep is None:
        lines.append("  reporting: off (no report_token or no motoko_url)")
        return lines
    last = rep.get("last")
    said = (
        "none yet"
        if last is None
        else "ok"
        if _delivered(last)
        else f"failed: {last.get('detail') or last.get('status')}"
    )
    lines.append(
        f"  reporting: to {rep.get('to')}: {rep.get('delivered')} delivered of {rep.get('attempts')}; last {said}"
    )
    return lines


def show(status: dict[str, Any]) -> None:
    """Plain text (no rich: structlog imports it when present, which costs the daemon 6 MiB)."""
    print("\n".join(render(status)))


def render(status: dict[str, Any]) -> list[str]:
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
    check = status.get("last_reload_check")
    if check:
        said = (
            f"served ({check.get('seconds')} s)" if check.get("ok") else f"NOT served: {_cut(check.get('detail'), 80)}"
        )
        lines.append(f"  last reload:    {said}")
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
    lines += _backend_lines(status.get("backend"))
    lines += _fleet_lines(status)
    lines += _routing_lines(status)
    lines += _rollout_lines(status)
    lines += _spend_lines(status)
    lines += _event_lines(status)
    return lines
