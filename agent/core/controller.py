"""The routing controller, pure: (policy, backend health, drains) -> the LiteLLM config in effect.

Motoko probes every backend (every ``health_interval_s``) and receives the node agents'
reports; this module turns what they saw into routing, with no I/O:

- ``observe``: one backend's state after one probe. A backend goes *out* of routing after
  ``failure_threshold`` consecutive failed probes, or at once on an unhealthy or stale node
  report (stale: older than ``STALE_AFTER_INTERVALS`` report intervals), or when drained. It
  comes back *in* only after ``RECOVER_AFTER`` consecutive good probes with a fresh healthy
  report (or none, where the backend has no node agent reporting for it) and no drain.
- ``Controller.step``: feeds probes through ``observe`` and damps flapping. A change (a
  backend out, or back in) is applied at once when no reload happened in the last
  ``window_s`` seconds: an out backend is costing requests, a recovered one is capacity.
  A change right after a reload waits until ``window_s`` has passed since the window opened
  and comes out with whatever else changed meanwhile, as one health map (one reload); a
  change undone within that wait comes out as nothing at all. So a flapping backend costs at
  most one reload per window.
- ``effective_config``: the decisions and the config text for a set of states: deterministic
  (same input, byte-identical text: sorted keys, no timestamps, no reasons).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import yaml

from agent.core.health import Stage
from agent.core.model import Fleet, RoutingPolicy
from agent.core.report import NodeReport
from agent.core.routing import Backend, Decision, Health, decide, litellm_config

#: Consecutive good probes (with a fresh healthy report) before an out backend is back in.
RECOVER_AFTER = 2
#: A node report older than this many report intervals is stale: the backend goes out.
STALE_AFTER_INTERVALS = 3
#: Changes within this many seconds are batched into one reload.
DEFAULT_WINDOW_S = 2.0


class ReportState(StrEnum):
    """What the latest node report says about a backend's host."""

    FRESH = "fresh"  # recent, and the host says its backend is ready
    STALE = "stale"  # too old, or none received yet
    UNHEALTHY = "unhealthy"  # recent, and the host says its backend is not ready


def classify_report(report: NodeReport | None, received_at: float | None, now: float, interval_s: float) -> ReportState:
    """Fresh, stale or unhealthy, from the latest report of a host that reports."""
    if report is None or received_at is None or now - received_at > STALE_AFTER_INTERVALS * interval_s:
        return ReportState.STALE
    ready = report.stage == Stage.READY and (report.health is None or report.health.ready)
    return ReportState.FRESH if ready else ReportState.UNHEALTHY


@dataclass(frozen=True, slots=True)
class BackendState:
    """Where one backend stands: in routing or out, since when and why."""

    name: str
    in_routing: bool = True
    since: float = 0.0  # when it last went in or out
    failures: int = 0  # consecutive failed probes
    successes: int = 0  # consecutive good probes
    reason: str = ""  # why it is where it is (status and logs; never in the config)
    drained: bool = False

    @property
    def health(self) -> Health:
        return Health(self.in_routing, self.reason)


def observe(
    state: BackendState,
    probe_ok: bool,
    reason: str,
    now: float,
    report: ReportState | None,
    policy: RoutingPolicy,
    *,
    drained: bool = False,
) -> BackendState:
    """The state after one probe (``reason``: what the probe saw) and the latest report
    (``None``: no node agent reports for this backend)."""
    counted = replace(
        state,
        failures=0 if probe_ok else state.failures + 1,
        successes=state.successes + 1 if probe_ok else 0,
        drained=drained,
    )
    out_why = _out_reason(counted, reason, report, policy)
    if state.in_routing and out_why:
        return replace(counted, in_routing=False, since=now, reason=out_why)
    if not state.in_routing and not out_why and counted.successes >= RECOVER_AFTER:
        return replace(counted, in_routing=True, since=now, reason=f"{RECOVER_AFTER} good probes")
    if not counted.in_routing and out_why:
        return replace(counted, reason=out_why)  # still out: the latest cause
    return counted


def _out_reason(state: BackendState, reason: str, report: ReportState | None, policy: RoutingPolicy) -> str:
    """Why the backend must be (or stay) out now; empty when nothing holds it out."""
    if state.drained:
        return "drained"
    if report is ReportState.STALE:
        return "node report stale"
    if report is ReportState.UNHEALTHY:
        return "node reports unhealthy"
    if state.failures >= policy.failure_threshold:
        return f"{state.failures} consecutive failed probes: {reason or 'failed'}"
    if not state.in_routing and state.failures:
        return f"probe failed: {reason or 'failed'}"
    return ""


@dataclass(frozen=True, slots=True)
class Probe:
    """One probe's outcome and the latest report for a backend."""

    ok: bool
    reason: str = ""
    report: ReportState | None = None


class Controller:
    """Backend states, and the health map to route by when (and only when) it changed.

    Pure: the clock comes in as ``now``; the caller renders and reloads once per health map
    returned by ``step``.
    """

    def __init__(self, policy: RoutingPolicy, names: Iterable[str] = (), window_s: float = DEFAULT_WINDOW_S) -> None:
        self.policy = policy
        self.window_s = window_s
        self.states: dict[str, BackendState] = {n: BackendState(n) for n in names}
        self._applied: frozenset[str] = frozenset()  # out in the config in effect (all in at first)
        self._opened: float | None = None  # when the current batch window opened
        self._emitted: float | None = None  # when the last health map came out

    def step(self, now: float, probes: Mapping[str, Probe], drains: Set[str] = frozenset()) -> dict[str, Health] | None:
        """Take a round of probes (backends not probed keep their state; call with none to
        let time pass); the health map when the batch window of a change has closed."""
        for name in sorted(set(probes) | set(drains) | set(self.states)):
            state = self.states.get(name, BackendState(name, since=now))
            p = probes.get(name)
            if p is not None:
                state = observe(state, p.ok, p.reason, now, p.report, self.policy, drained=name in drains)
            elif (name in drains) != state.drained:
                state = _drain(state, name in drains, now)
            self.states[name] = state
        return self._damped(now)

    def adopt(self, old: Controller) -> None:
        """Carry over what ``old`` knew of the backends this one routes (a new commit's policy
        or targets must not put an out backend back in, nor reload what is already applied)."""
        for name in self.states:
            if name in old.states:
                self.states[name] = old.states[name]
        self._applied = old._applied & set(self.states)

    def out(self) -> frozenset[str]:
        return frozenset(n for n, s in self.states.items() if not s.in_routing)

    def health(self) -> dict[str, Health]:
        return {n: self.states[n].health for n in sorted(self.states)}

    def _damped(self, now: float) -> dict[str, Health] | None:
        out = self.out()
        if out == self._applied:
            self._opened = None  # nothing changed, or a change undone within the window
            return None
        if self._opened is None:
            self._opened = now
        # Quiet (no reload within the window): this change goes out now. Else it waits for the
        # window and leaves with whatever else changed meanwhile.
        quiet = self._emitted is None or now - self._emitted >= self.window_s
        if not quiet and now - self._opened < self.window_s:
            return None
        self._applied, self._opened, self._emitted = out, None, now
        return self.health()


def _drain(state: BackendState, drained: bool, now: float) -> BackendState:
    """A drain set or lifted between probes: out at once; back only through good probes."""
    if drained:
        return replace(
            state, drained=True, in_routing=False, since=now if state.in_routing else state.since, reason="drained"
        )
    return replace(state, drained=False)


def effective_config(
    fleet: Fleet,
    table: list[Backend],
    states: Mapping[str, BackendState],
    budget_exceeded: bool,
    extra_router: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Decision], str]:
    """The decisions and the LiteLLM config text in effect for these backend states.

    Deterministic: the same input gives byte-identical text (keys sorted, no timestamps, no
    reasons), so an unchanged routing is never a reload.
    """
    health = {name: states[name].health for name in sorted(states)}
    decisions = decide(fleet.routing, table, health, budget_exceeded)
    config = litellm_config(fleet, decisions, extra_router)
    return decisions, _dump_sorted(config)


def _dump_sorted(data: Any) -> str:
    try:
        from yaml import CSafeDumper as dumper
    except ImportError:  # pragma: no cover
        from yaml import SafeDumper as dumper  # type: ignore[assignment]
    return yaml.dump(data, Dumper=dumper, sort_keys=True, default_flow_style=False, width=1000, allow_unicode=True)
