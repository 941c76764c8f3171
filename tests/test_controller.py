"""The routing controller (pure): thresholds, damping, and properties of the routing it gives
for every combination of backend health, drains and budget."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.controller import (
    RECOVER_AFTER,
    BackendState,
    Controller,
    Probe,
    ReportState,
    classify_report,
    effective_config,
    observe,
)
from agent.core.health import BackendHealth, Check, Stage
from agent.core.model import Fleet, RoutingPolicy
from agent.core.report import NodeReport
from agent.core.routing import Backend, Decision, chain, decide, litellm_config


def table() -> list[Backend]:
    return [
        Backend("armitage", "local/chat", "vllm", "hosted_vllm/q", "http://armitage:8000/v1", "armitage", 8192),
        Backend(
            "wintermute", "local/reasoner", "vllm", "hosted_vllm/l", "http://wintermute:8000/v1", "wintermute", 32768
        ),
        Backend("motoko-embed", "local/embed", "embedding", "hosted_vllm/bge", "http://motoko:8200/v1", None, 512),
        Backend("openai-strong", "openai/strong", "openai", "openai/gpt-4.1-mini", None, None),
        Backend("openai-cheap", "openai/cheap", "openai", "openai/gpt-4o-mini", None, None),
    ]


NAMES = [b.name for b in table()]
POLICY = RoutingPolicy()  # failure_threshold 3


def run(state: BackendState, *probes: bool, report: ReportState | None = None, drained: bool = False) -> BackendState:
    for i, ok in enumerate(probes):
        state = observe(state, ok, "" if ok else "timeout after 2 s", float(i), report, POLICY, drained=drained)
    return state


# --------------------------------------------------------------------------- thresholds


def test_out_after_exactly_failure_threshold_failed_probes() -> None:
    s = BackendState("armitage")
    assert run(s, False, False).in_routing
    out = run(s, False, False, False)
    assert not out.in_routing and out.failures == 3
    assert "3 consecutive failed probes" in out.reason and "timeout" in out.reason
    assert run(s, False, False, True, False, False).in_routing, "a good probe resets the count"


def test_back_after_exactly_two_good_probes() -> None:
    out = run(BackendState("armitage"), False, False, False)
    assert not run(out, True).in_routing
    back = run(out, *[True] * RECOVER_AFTER)
    assert back.in_routing and RECOVER_AFTER == 2
    assert not run(out, True, False, True).in_routing, "the good probes must be consecutive"


def test_a_stale_or_unhealthy_report_takes_out_at_once_and_holds_out() -> None:
    s = BackendState("armitage")
    stale = run(s, True, report=ReportState.STALE)
    assert not stale.in_routing and stale.reason == "node report stale"
    assert not run(s, True, report=ReportState.UNHEALTHY).in_routing
    assert not run(stale, True, True, True, report=ReportState.STALE).in_routing, "good probes alone do not return it"
    assert run(stale, True, True, report=ReportState.FRESH).in_routing
    assert run(stale, True, True, report=None).in_routing, "no reporting configured: probes decide"


def test_drain_takes_out_regardless_and_lifting_it_needs_good_probes() -> None:
    s = BackendState("armitage")
    drained = run(s, True, True, True, report=ReportState.FRESH, drained=True)
    assert not drained.in_routing and drained.drained and drained.reason == "drained"
    assert run(drained, True, True, report=ReportState.FRESH).in_routing
    c = Controller(POLICY, NAMES, window_s=0)
    health = c.step(0.0, {}, drains={"armitage"})
    assert health is not None and not health["armitage"].healthy, "a drain between probes takes effect at once"


def test_classify_report() -> None:
    ready = BackendHealth(
        checks=(Check(name="health", ok=True), Check(name="models", ok=True), Check(name="canary", ok=True))
    )
    report = NodeReport(
        host="armitage",
        role="gpu_node",
        stage=Stage.READY,
        health=ready,
        boot_id="0" * 16,
        seq=1,
        sent_at=0.0,
        agent_version="1",
    )
    assert classify_report(report, 100.0, 120.0, 10.0) is ReportState.FRESH
    assert classify_report(report, 100.0, 131.0, 10.0) is ReportState.STALE
    assert classify_report(None, None, 0.0, 10.0) is ReportState.STALE
    loading = report.model_copy(update={"stage": Stage.LOADING})
    assert classify_report(loading, 100.0, 101.0, 10.0) is ReportState.UNHEALTHY


# --------------------------------------------------------------------------- damping


def fail(reason: str = "refused") -> Probe:
    return Probe(False, reason)


def test_a_backend_newly_out_is_taken_out_at_once() -> None:
    c = Controller(POLICY, NAMES, window_s=2.0)
    ok = {n: Probe(True) for n in NAMES}
    assert c.step(0.0, ok) is None, "nothing changed: no reload"
    for t in (1.0, 2.0):
        assert c.step(t, {"armitage": fail()}) is None
    health = c.step(3.0, {"armitage": fail()})
    assert health is not None and not health["armitage"].healthy, "third failure: out now, no window"
    assert c.step(3.5, {"armitage": fail()}) is None, "applied: no second reload for the same routing"


def test_changes_right_after_a_reload_come_out_as_one_health_map() -> None:
    c = Controller(POLICY, NAMES, window_s=2.0)
    health = c.step(0.0, {"armitage": Probe(True, report=ReportState.STALE)})
    assert health is not None and not health["armitage"].healthy
    assert c.step(0.5, {"wintermute": Probe(True, report=ReportState.STALE)}) is None, "within 2 s of a reload"
    assert c.step(1.0, {"wintermute": Probe(True, report=ReportState.STALE)}) is None
    assert c.step(1.9, {}) is None, "still within 2 s of the last reload"
    health = c.step(2.0, {})
    assert health is not None and not health["armitage"].healthy and not health["wintermute"].healthy, (
        "2 s after the last reload: the batch comes out"
    )
    assert health["openai-strong"].healthy


def test_a_flap_undone_within_the_window_is_no_reload() -> None:
    c = Controller(POLICY, NAMES, window_s=2.0)
    assert c.step(0.0, {"armitage": fail()}) is None and c.step(0.1, {"armitage": fail()}) is None
    health = c.step(0.2, {"armitage": fail()})
    assert health is not None and not health["armitage"].healthy, "out at once: no reload before"
    # Back in after two good probes, right after that reload: it waits for the window...
    assert c.step(0.5, {"armitage": Probe(True)}) is None
    assert c.step(1.0, {"armitage": Probe(True)}) is None, "in: waits"
    # ...and out again within it: the flap is undone, nothing to reload.
    assert c.step(1.5, {"armitage": Probe(False, "refused", ReportState.UNHEALTHY)}) is None
    assert not any(c.step(t, {}) for t in (3.0, 5.0, 9.0))
    # Back in for good, long after the last reload: at once.
    assert c.step(10.0, {"armitage": Probe(True)}) is None, "one good probe"
    health = c.step(10.5, {"armitage": Probe(True)})
    assert health is not None and health["armitage"].healthy


def test_a_backend_back_in_is_put_back_at_once_when_no_reload_is_recent() -> None:
    c = Controller(POLICY, NAMES, window_s=2.0)
    assert c.step(0.0, {"armitage": fail()}) is None and c.step(0.1, {"armitage": fail()}) is None
    assert c.step(0.2, {"armitage": fail()}) is not None
    assert c.step(5.0, {"armitage": Probe(True)}) is None
    health = c.step(7.0, {"armitage": Probe(True)})
    assert health is not None and health["armitage"].healthy


def test_a_flapping_backend_costs_at_most_one_reload_per_window() -> None:
    c = Controller(POLICY, NAMES, window_s=2.0)
    reloads = []
    for i in range(40):  # out, in, out, in... every 0.5 s for 20 s
        t = i * 0.5
        report = ReportState.UNHEALTHY if (i // 3) % 2 else ReportState.FRESH
        if c.step(t, {"armitage": Probe(True, report=report)}) is not None:
            reloads.append(t)
    gaps = [b - a for a, b in itertools.pairwise(reloads)]
    assert reloads and all(g >= 2.0 for g in gaps), reloads


# --------------------------------------------------------------------------- properties

FLEET = Fleet()
TABLE = table()

combos = st.fixed_dictionaries(
    {
        n: st.tuples(st.lists(st.booleans(), max_size=6), st.sampled_from([*ReportState, None]), st.booleans())
        for n in NAMES
    }
)


def states_of(combo: dict[str, tuple[list[bool], ReportState | None, bool]]) -> dict[str, BackendState]:
    out = {}
    for name, (probes, report, drained) in combo.items():
        s = BackendState(name)
        for i, ok in enumerate(probes):
            s = observe(s, ok, "x", float(i), report, POLICY, drained=drained)
        if drained and not probes:
            s = observe(s, True, "", 0.0, report, POLICY, drained=True)
        out[name] = s
    return out


def effective_chain(policy: RoutingPolicy, alias: str, budget: bool) -> list[Backend]:
    native = {b.alias: b for b in TABLE}
    if budget and native[alias].kind == "openai":
        return [native[a] for a in chain(policy, policy.budget_fallback) if native[a].kind != "openai"]
    return [native[a] for a in chain(policy, alias) if a in native]


def check_routing(decisions: dict[str, Decision], states: dict[str, BackendState], budget: bool) -> None:
    up = {n for n, s in states.items() if s.in_routing}
    for alias, d in decisions.items():
        usable = [
            b for b in effective_chain(POLICY, alias, budget) if b.name in up and not (budget and b.kind == "openai")
        ]
        if usable:  # (1) never an out backend while a healthy entry of its chain exists
            assert d.available and d.backend == usable[0], (alias, d)
            assert all(b.name in up for b in d.deployments), (alias, d)
        else:  # (2) or explicitly unavailable, still one deployment so the group exists
            assert not d.available and d.deployments, (alias, d)
    assert set(decisions) == {b.alias for b in TABLE}


def check_budget_and_context(decisions: dict[str, Decision], cfg: dict[str, Any], budget: bool) -> None:
    policy = FLEET.routing
    if budget:  # (3) budget rule: openai/* served by the budget fallback's chain, never by OpenAI
        for alias in ("openai/strong", "openai/cheap"):
            d = decisions[alias]
            assert d.backend.kind != "openai" and "budget spent" in d.reason
    context = {k: v for e in cfg["router_settings"]["context_window_fallbacks"] for k, v in e.items()}
    for m in cfg["model_list"]:  # (3) context rule: no local deployment takes more than the fleet limit
        if m["litellm_params"]["model"].startswith("hosted_vllm/") and m["model_info"].get("mode") != "embedding":
            assert m["model_info"]["max_input_tokens"] <= policy.max_input_tokens
    for alias, d in decisions.items():
        if d.deployments[0].kind == "vllm" and alias != policy.long_context_alias:
            assert context[alias][0] == policy.long_context_alias, alias


@pytest.mark.slow  # property test (hypothesis): runs in CI
@settings(max_examples=200, derandomize=True, deadline=None)
@given(combo=combos, budget=st.booleans())
def test_routing_properties_hold_for_every_health_drain_and_budget(
    combo: dict[str, tuple[list[bool], ReportState | None, bool]], budget: bool
) -> None:
    """(1) no out backend while a healthy chain entry exists, (2) resolved or explicitly
    unavailable, (3) the budget and context rules, for every combination."""
    states = states_of(combo)
    decisions = decide(FLEET.routing, TABLE, {n: s.health for n, s in states.items()}, budget)
    check_routing(decisions, states, budget)
    check_budget_and_context(decisions, litellm_config(FLEET, decisions), budget)


@pytest.mark.slow
@settings(max_examples=200, derandomize=True, deadline=None)
@given(combo=combos, budget=st.booleans())
def test_effective_config_is_deterministic_and_holds_no_reasons(
    combo: dict[str, tuple[list[bool], ReportState | None, bool]], budget: bool
) -> None:
    """(4) same input, byte-identical text, whatever the order of the states; the text is the
    config the decisions give, and no reason is in it."""
    states = states_of(combo)
    decisions, text = effective_config(FLEET, TABLE, states, budget)
    assert yaml.load(text, Loader=yaml.CSafeLoader) == litellm_config(FLEET, decisions)
    again = effective_config(FLEET, TABLE, dict(reversed(list(states.items()))), budget)[1]
    assert again == text
    assert not [d.reason for d in decisions.values() if d.reason in text], "no reasons in the config"
    assert not [s.reason for s in states.values() if s.reason and s.reason in text]


def test_all_healthy_config_is_what_routing_renders_unchanged() -> None:
    """The controller with every backend in gives exactly the config the agent renders today."""
    states = {n: BackendState(n) for n in NAMES}
    decisions, text = effective_config(FLEET, TABLE, states, False)
    assert yaml.safe_load(text) == litellm_config(FLEET, decide(FLEET.routing, TABLE))
    assert all(d.available for d in decisions.values())


def test_budget_fallback_down_serves_openai_through_its_chain() -> None:
    states = {n: BackendState(n) for n in NAMES}
    states["armitage"] = BackendState("armitage", in_routing=False, reason="3 consecutive failed probes")
    decisions, _ = effective_config(FLEET, TABLE, states, True)
    assert decisions["openai/strong"].backend.name == "wintermute"
    states["wintermute"] = BackendState("wintermute", in_routing=False)
    decisions, _ = effective_config(FLEET, TABLE, states, True)
    assert not decisions["openai/strong"].available
    assert not decisions["local/chat"].available, "no local left and the budget is spent: explicitly unavailable"


@pytest.mark.parametrize("budget", [False, True])
def test_reasons_never_reach_the_config(budget: bool) -> None:
    a = {n: BackendState(n, in_routing=n != "armitage", reason="first wording") for n in NAMES}
    b = {n: BackendState(n, in_routing=n != "armitage", reason="second wording", since=99.0) for n in NAMES}
    assert effective_config(FLEET, TABLE, a, budget)[1] == effective_config(FLEET, TABLE, b, budget)[1]
