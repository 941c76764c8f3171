"""Drain leases: the capacity floor (pure), and the desk on a real fleet API over TCP: granted,
refused while another chain member is out, renewed, given back, expired, kept across a restart
of the motoko agent, never held twice; forged or broken requests refused with nothing changed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.drain import Group, Lease, groups, refusal
from agent.core.model import DrainPolicy
from agent.core.routing import Backend, backends
from agent.desired.load import load_desired
from agent.fleet.api import FleetApi
from agent.fleet.drains import DrainContext
from tests.fleetkit import fleet_api

ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"armitage": "tok-armitage", "wintermute": "tok-wintermute", "straylight": "tok-straylight"}
NOW = 1_800_000_000.0


# --------------------------------------------------------------------------- the rule, pure

CHAT = Group("local/chat", frozenset({"armitage", "wintermute"}))


def test_the_shipped_fleet_has_one_group_armitage_and_wintermute() -> None:
    desired = load_desired(ROOT / "desired_state")
    table, _ = backends(desired.fleet, desired.hosts)
    assert groups(desired.fleet.routing, table) == [CHAT]


def test_a_drain_is_granted_when_the_rest_of_the_chain_is_in() -> None:
    assert refusal("armitage", {"armitage"}, [], {}, [CHAT], NOW) is None


def test_a_drain_waits_while_another_member_holds_a_lease() -> None:
    held = [Lease("wintermute", frozenset({"wintermute"}), NOW - 5, NOW + 60)]
    why = refusal("armitage", {"armitage"}, held, {}, [CHAT], NOW)
    assert why is not None and "wintermute is drained by wintermute" in why and "local/chat" in why


def test_a_drain_waits_while_another_member_is_out_for_any_reason() -> None:
    why = refusal("armitage", {"armitage"}, [], {"wintermute": "node report stale"}, [CHAT], NOW)
    assert why is not None and "wintermute is out of routing (node report stale)" in why


def test_an_expired_lease_holds_nothing() -> None:
    held = [Lease("wintermute", frozenset({"wintermute"}), NOW - 500, NOW - 1)]
    assert refusal("armitage", {"armitage"}, held, {}, [CHAT], NOW) is None


def test_two_out_allowed_when_the_policy_says_so() -> None:
    held = [Lease("wintermute", frozenset({"wintermute"}), NOW, NOW + 60)]
    assert refusal("armitage", {"armitage"}, held, {}, [CHAT], NOW, max_out=2) is None


def test_a_backend_in_no_shared_chain_is_never_held_back() -> None:
    held = [Lease("wintermute", frozenset({"wintermute"}), NOW, NOW + 60)]
    assert refusal("straylight", {"straylight"}, held, {"wintermute": "dead"}, [CHAT], NOW) is None


MEMBERS = ["a", "b", "c", "d"]


@settings(max_examples=300, deadline=None)
@given(
    chains=st.lists(st.sets(st.sampled_from(MEMBERS), min_size=2), min_size=1, max_size=3),
    out=st.sets(st.sampled_from(MEMBERS)),
    order=st.permutations(MEMBERS),
    max_out=st.integers(1, 2),
)
def test_granting_in_any_order_never_breaks_the_floor(
    chains: list[set[str]], out: set[str], order: list[str], max_out: int
) -> None:
    """Hosts asking one after another, with some backends already out: in every group, the
    backends unavailable (out or leased) never exceed ``max_out`` because of a grant."""
    gs = [Group(f"g{i}", frozenset(c)) for i, c in enumerate(chains)]
    leases: list[Lease] = []
    why_out = dict.fromkeys(out, "down")
    for host in order:
        if refusal(host, {host}, leases, why_out, gs, NOW, max_out) is None:
            leases.append(Lease(host, frozenset({host}), NOW, NOW + 60))
    granted = {lease.host for lease in leases}
    for g in gs:
        unavailable = g.members & (granted | out)
        before = g.members & out
        # A grant never makes a group worse than max_out; a group already past it gets no grant.
        assert len(unavailable) <= max(max_out, len(before))
        if len(before) >= max_out:
            assert not (g.members & granted - out)


# --------------------------------------------------------------------------- the desk over HTTP


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def context() -> DrainContext:
    desired = load_desired(ROOT / "desired_state")
    table, _ = backends(desired.fleet, desired.hosts)
    extra = Backend("straylight", "local/other", "vllm", "hosted_vllm/x", "http://straylight:8000/v1", "straylight")
    return DrainContext.of(desired.fleet.model_copy(update={"drain": DrainPolicy(lease_ttl_s=60)}), [*table, extra])


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FleetApi]:
    clock = Clock()
    with fleet_api(tmp_path / "fleet.db", TOKENS, clock=clock) as a:
        a.drains.context = context()
        yield a


def ask(
    api: FleetApi, host: str, body: Any = None, auth: str | None = None, raw: bytes | None = None
) -> httpx.Response:
    headers = {"Authorization": auth if auth is not None else f"Bearer {TOKENS[host]}"}
    content = raw if raw is not None else json.dumps(body or {"reason": "vllm: image changed"}).encode()
    return httpx.post(f"{api.url}/v1/drains", content=content, headers=headers, timeout=5)


def give_back(api: FleetApi, host: str) -> httpx.Response:
    return httpx.delete(f"{api.url}/v1/drains", headers={"Authorization": f"Bearer {TOKENS[host]}"}, timeout=5)


def rollout(api: FleetApi) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{api.url}/v1/drains", timeout=5).json()
    return data


def test_granted_then_the_second_chain_member_waits_until_it_is_given_back(api: FleetApi) -> None:
    r = ask(api, "armitage")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["granted"] is True and body["backends"] == ["armitage"] and body["reason"] == "vllm: image changed"
    assert body["routed_out"] is False  # nothing confirmed by the proxy yet
    waiting = ask(api, "wintermute")
    assert waiting.status_code == 409
    assert "armitage is drained by armitage" in waiting.json()["error"]
    view = rollout(api)
    assert [lease["host"] for lease in view["leases"]] == ["armitage"]
    assert [w["host"] for w in view["waiting"]] == ["wintermute"]
    assert give_back(api, "armitage").json() == {"released": True, "host": "armitage"}
    assert ask(api, "wintermute").status_code == 200
    assert rollout(api)["waiting"] == []


def test_a_backend_out_of_routing_holds_its_chain(api: FleetApi) -> None:
    api.drains.out_of_routing = lambda: {"wintermute": "3 consecutive failed probes: timed out"}
    r = ask(api, "armitage")
    assert r.status_code == 409 and "out of routing (3 consecutive failed probes" in r.json()["error"]
    api.drains.out_of_routing = dict
    assert ask(api, "armitage").status_code == 200


def test_asking_again_renews_and_never_holds_two(api: FleetApi) -> None:
    clock: Clock = api.drains.clock  # type: ignore[assignment]
    first = ask(api, "armitage").json()
    clock.now += 30
    again = ask(api, "armitage").json()
    assert again["granted_at"] == first["granted_at"] and again["expires_at"] == first["expires_at"] + 30
    assert len(api.store.leases()) == 1


def test_a_lease_not_renewed_expires_and_frees_the_chain(api: FleetApi) -> None:
    clock: Clock = api.drains.clock  # type: ignore[assignment]
    assert ask(api, "armitage").status_code == 200
    assert api.drains.drained_backends() == {"armitage"}
    assert 'llm_fleet_drain_lease{host="armitage"} 1.0' in httpx.get(f"{api.url}/metrics", timeout=5).text
    clock.now += 61
    assert api.drains.drained_backends() == frozenset()
    assert rollout(api)["leases"][0]["state"] == "expired"
    assert 'llm_fleet_drain_lease{host="armitage"} 0.0' in httpx.get(f"{api.url}/metrics", timeout=5).text
    assert ask(api, "wintermute").status_code == 200


def test_routed_out_once_the_proxy_serves_without_it(api: FleetApi) -> None:
    served: set[str] = set()
    api.drains.routed_out = lambda backends: backends <= served
    assert ask(api, "armitage").json()["routed_out"] is False
    served.add("armitage")
    assert ask(api, "armitage").json()["routed_out"] is True
    assert rollout(api)["leases"][0]["state"] == "routed out"


def test_leases_survive_a_restart_of_the_motoko_agent(tmp_path: Path) -> None:
    clock = Clock()
    db = tmp_path / "fleet.db"
    with fleet_api(db, TOKENS, clock=clock) as first:
        first.drains.context = context()
        assert ask(first, "armitage").status_code == 200
    with fleet_api(db, TOKENS, clock=clock) as second:
        second.drains.context = context()
        assert second.drains.drained_backends() == {"armitage"}
        assert ask(second, "wintermute").status_code == 409
        renewed = ask(second, "armitage")
        assert renewed.status_code == 200 and len(second.store.leases()) == 1


def test_two_hosts_asking_at_once_are_never_both_granted(api: FleetApi) -> None:
    codes: dict[str, int] = {}
    barrier = threading.Barrier(2)

    def go(host: str) -> None:
        barrier.wait()
        codes[host] = ask(api, host).status_code

    threads = [threading.Thread(target=go, args=(h,)) for h in ("armitage", "wintermute")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes.values()) == [200, 409]


@pytest.mark.parametrize(
    ("auth", "raw", "code", "error"),
    [
        ("", None, 401, "bearer token is required"),
        ("Bearer nope", None, 401, "unknown token"),
        (None, b"{not json", 400, "not JSON"),
        (None, b"[1, 2]", 400, "JSON object"),
        (None, b'{"reason": 5}', 400, "reason: must be a string"),
        (None, b'{"host": "wintermute"}', 400, "unknown field(s): host"),
        (None, b"x" * (65 * 1024), 413, ""),
    ],
)
def test_forged_or_broken_requests_change_nothing(
    api: FleetApi, auth: str | None, raw: bytes | None, code: int, error: str
) -> None:
    r = ask(api, "armitage", auth=auth, raw=raw)
    assert r.status_code == code, r.text
    if error:
        assert error in r.json()["error"]
    assert api.store.leases() == []


def test_a_host_can_only_give_back_its_own_lease(api: FleetApi) -> None:
    assert ask(api, "armitage").status_code == 200
    assert give_back(api, "wintermute").json() == {"released": False, "host": "wintermute"}
    assert api.drains.drained_backends() == {"armitage"}


def test_a_long_reason_is_cut_to_one_line(api: FleetApi) -> None:
    r = ask(api, "armitage", body={"reason": "a\nb\t" + "x" * 1000})
    assert r.json()["reason"].startswith("a b x") and len(r.json()["reason"]) == 200


def test_no_fleet_settings_yet_is_503(api: FleetApi) -> None:
    api.drains.context = None
    r = ask(api, "armitage")
    assert r.status_code == 503 and "ask again" in r.json()["error"]
