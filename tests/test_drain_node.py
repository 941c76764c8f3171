"""The node's side of a drain (``agent.node.drain.FleetDrain``) against a real fleet API over
HTTP, with a scripted local vLLM and a fake clock: lease, routed out, idle, replaced, canary,
given back; waiting for a lease and saying why; going on when motoko cannot be reached; the
deadline; and the executor wrapping exactly the disruptive actions of a drained service."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from agent.adapters.fleetclient import HttpxDrains
from agent.adapters.vllm import DOWN
from agent.core.health import BackendHealth, Check, Load
from agent.core.model import DrainPolicy
from agent.core.outcomes import Failure
from agent.core.plan import container_labels, desired_service, plan
from agent.core.stack import StackFile, StackSpec, parse_compose
from agent.core.yamlsrc import load
from agent.fleet.api import FleetApi
from agent.node.drain import DrainHooks, DrainNotGranted, DrainTarget, FleetDrain
from agent.node.executor import Executor, Rollout
from agent.testing.fakes import FakeClock, FakeEngine
from tests.fleetkit import fleet_api
from tests.test_drain_leases import NOW, TOKENS, context

READY = BackendHealth(checks=tuple(Check(name=n, ok=True) for n in ("health", "models", "canary")))
REFUSED = BackendHealth.failed("connection refused")


class ScriptedVllm:
    """Loads and probe results handed out in order (the last one repeats)."""

    def __init__(self, loads: list[Load | str], probes: list[BackendHealth]) -> None:
        self.loads, self.probes = list(loads), list(probes)
        self.load_reads = 0

    def load(self, api_base: str) -> Load | str:
        self.load_reads += 1
        return self.loads.pop(0) if len(self.loads) > 1 else self.loads[0]

    def probe(self, api_base: str, served_name: str) -> BackendHealth:
        return self.probes.pop(0) if len(self.probes) > 1 else self.probes[0]


class TickClock(FakeClock):
    """A fake clock that runs ``on_sleep`` at every sleep (the world moving meanwhile)."""

    def __init__(self, on_sleep: Callable[[float], None] = lambda now: None) -> None:
        super().__init__(NOW)
        self.on_sleep = on_sleep

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.on_sleep(self.now)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FleetApi]:
    with fleet_api(tmp_path / "fleet.db", TOKENS) as a:
        a.drains.context = context()
        yield a


@pytest.fixture
def client() -> Iterator[HttpxDrains]:
    c = HttpxDrains(timeout_s=2.0)
    yield c
    c.close()


def target(url: str | None, deadline: float = 300.0, **policy: float) -> DrainTarget:
    return DrainTarget(
        host="armitage",
        motoko_url=url,
        token=TOKENS["armitage"],
        api_base="http://127.0.0.1:1/v1",
        served_name="qwen",
        policy=DrainPolicy(**policy),  # type: ignore[arg-type]
        deadline_s=deadline,
    )


def drain_of(
    t: DrainTarget, client: HttpxDrains, vllm: ScriptedVllm, clock: FakeClock, said: list[str], stages: list[bool]
) -> FleetDrain:
    hooks = DrainHooks(say=said.append, on_stage=stages.append)
    return FleetDrain(t, client, vllm, hooks, clock=clock)


def test_a_drain_waits_for_routing_and_idleness_then_gives_the_lease_back(api: FleetApi, client: HttpxDrains) -> None:
    api.drains.routed_out = lambda backends: True
    vllm = ScriptedVllm(
        [Load(running=2, waiting=1), Load(running=1, waiting=0), Load(running=0, waiting=0)], [REFUSED, READY]
    )
    said: list[str] = []
    stages: list[bool] = []
    inside: list[frozenset[str]] = []
    gate = drain_of(target(api.url), client, vllm, FakeClock(NOW), said, stages)
    with gate("vllm", "image changed"):
        inside.append(api.drains.drained_backends())  # replaced while the lease is held
        assert gate.state.stage == "replacing"
    assert inside == [frozenset({"armitage"})]
    assert vllm.load_reads == 3, "replaced only once vLLM had nothing running or waiting"
    assert stages == [True, False]
    assert api.store.leases() == [], "given back once the new backend answered its canary"
    text = "\n".join(said)
    assert "drain lease granted" in text and "out of the gateway's routing" in text and "drained in" in text
    assert gate.state.stage == "idle"


def test_a_node_waits_for_its_lease_and_says_why(api: FleetApi, client: HttpxDrains) -> None:
    assert httpx.post(
        f"{api.url}/v1/drains", json={}, headers={"Authorization": f"Bearer {TOKENS['wintermute']}"}
    ).is_success
    released: list[float] = []

    def wintermute_back(now: float) -> None:  # wintermute finishes after a minute
        if now - NOW >= 60 and not released:
            api.drains.release("wintermute")
            released.append(now)

    api.drains.routed_out = lambda backends: True
    said: list[str] = []
    clock = TickClock(wintermute_back)
    gate = drain_of(target(api.url), client, ScriptedVllm([Load(running=0, waiting=0)], [READY]), clock, said, [])
    with gate("vllm", "model changed"):
        assert released, "the drain went ahead while wintermute still held its lease"
        assert api.drains.drained_backends() == {"armitage"}
    assert any("waiting for a drain lease: wintermute is drained by wintermute" in line for line in said)


def test_no_lease_within_lease_wait_fails_without_replacing(api: FleetApi, client: HttpxDrains) -> None:
    api.drains.out_of_routing = lambda: {"wintermute": "node report stale"}
    gate = drain_of(target(api.url, lease_wait_s=30), client, ScriptedVllm([DOWN], [READY]), FakeClock(NOW), [], [])
    ran = []
    with (
        pytest.raises(DrainNotGranted, match=r"no drain lease within 30s .*wintermute is out of routing"),
        gate("vllm", "model changed"),
    ):
        ran.append(True)
    assert ran == [] and api.store.leases() == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_motoko_unreachable_the_node_goes_on_after_its_deadline_and_says_so(client: HttpxDrains) -> None:
    clock = FakeClock(NOW)
    said: list[str] = []
    gate = drain_of(
        target(f"http://127.0.0.1:{free_port()}", unreachable_s=20),
        client,
        ScriptedVllm([Load(running=0, waiting=0)], [READY]),
        clock,
        said,
        [],
    )
    with gate("vllm", "image changed"):
        waited = clock.now - NOW
    assert 20 <= waited <= 25
    assert any("going on WITHOUT a drain" in line for line in said)


def test_the_drain_deadline_bounds_the_wait_for_idleness(api: FleetApi, client: HttpxDrains) -> None:
    api.drains.routed_out = lambda backends: True
    clock = FakeClock(NOW)
    said: list[str] = []
    gate = drain_of(
        target(api.url, deadline=45), client, ScriptedVllm([Load(running=1, waiting=0)], [READY]), clock, said, []
    )
    with gate("vllm", "image changed"):
        assert 45 <= clock.now - NOW <= 47
    assert any("drain deadline (45s) passed with 1 running" in line for line in said)


def test_gauges_that_time_out_are_a_busy_server_not_an_idle_one(api: FleetApi, client: HttpxDrains) -> None:
    api.drains.routed_out = lambda backends: True
    clock = FakeClock(NOW)
    vllm = ScriptedVllm(["timed out", "timed out", Load(running=1, waiting=0), Load(running=0, waiting=0)], [READY])
    with drain_of(target(api.url), client, vllm, clock, [], [])("vllm", "image changed"):
        assert vllm.load_reads == 4, "replaced before its gauges said idle"


def test_a_removal_gives_the_lease_back_without_waiting_for_a_canary(api: FleetApi, client: HttpxDrains) -> None:
    api.drains.routed_out = lambda backends: True
    vllm = ScriptedVllm([Load(running=0, waiting=0)], [REFUSED])
    clock = FakeClock(NOW)
    with drain_of(target(api.url), client, vllm, clock, [], [])("vllm", "removed", comes_back=False):
        pass
    assert clock.now - NOW < 5 and api.store.leases() == []


# --------------------------------------------------------------------------- in the executor

IMG = {"vllm:1": "sha256:img", "side:1": "sha256:side"}


def stack_of(v: str) -> StackSpec:
    doc = {
        "services": {
            "vllm": {"image": "vllm:1", "ports": ["8000:8000"], "environment": {"V": v}},
            "side": {"image": "side:1", "environment": {"V": v}},
        }
    }
    return parse_compose(load(yaml.safe_dump(doc), "t"), "p", dict[str, StackFile]())


class RecordingDrain:
    def __init__(self, engine: FakeEngine, refuse: bool = False) -> None:
        self.log: list[str] = []
        self.refuse = refuse
        engine.on("stop", lambda cid: self.log.append("engine stop"))
        engine.on("start", lambda cid: self.log.append("engine start"))

    def __call__(self, service: str, reason: str, comes_back: bool) -> AbstractContextManager[None]:
        @contextmanager
        def block() -> Iterator[None]:
            if self.refuse:
                raise DrainNotGranted(f"{service}: no drain lease within 900s (wintermute is drained)")
            self.log.append(f"drain {service}")
            yield
            self.log.append(f"back {service}")

        return block()


def running(engine: FakeEngine) -> None:
    old = stack_of("1")
    for name in ("vllm", "side"):
        engine.add(
            f"p-{name}-1", container_labels(old, desired_service(old, name, IMG[f"{name}:1"]), "h", "c0"), f"{name}:1"
        )
    engine.ensure_network("p_default", "p", "default", "bridge")


def test_only_the_drained_service_is_drained_and_around_its_replacement(tmp_path: Path) -> None:
    engine = FakeEngine(IMG)
    running(engine)
    new = stack_of("2")
    actions = plan(new, engine.observe("p", ["vllm:1", "side:1"]))
    drain = RecordingDrain(engine)
    rollout = Rollout("h", "c1", drained=frozenset({"vllm"}), drain=drain)
    result = Executor(engine, tmp_path, rollout, FakeClock()).apply(new, actions)
    assert result.ok, result.error
    assert drain.log.count("drain vllm") == 1 and not any("side" in line for line in drain.log)
    first, last = drain.log.index("drain vllm"), drain.log.index("back vllm")
    assert "engine stop" in drain.log[first:last] and "engine start" in drain.log[first:last]


def test_no_lease_is_a_drain_failure_not_a_failed_rollout_and_nothing_changes(tmp_path: Path) -> None:
    engine = FakeEngine(IMG)
    running(engine)
    before = engine.by_name()
    new = stack_of("2")
    actions = [a for a in plan(new, engine.observe("p", ["vllm:1", "side:1"])) if a.target == "vllm"]
    rollout = Rollout("h", "c1", drained=frozenset({"vllm"}), drain=RecordingDrain(engine, refuse=True))
    result = Executor(engine, tmp_path, rollout, FakeClock()).apply(new, actions)
    assert not result.ok and result.failure is Failure.DRAIN and not result.rollout_failed
    assert "no drain lease within 900s" in (result.error or "")
    assert engine.by_name() == before


def test_status_shows_the_rollout_on_motoko_and_the_drain_on_the_node() -> None:
    from agent.daemon.status import render

    motoko = {
        "host": "motoko",
        "role": "motoko",
        "drains": {
            "leases": [
                {
                    "host": "armitage",
                    "backends": ["armitage"],
                    "state": "routed out",
                    "expires_in_s": 88.0,
                    "reason": "vllm: image changed",
                }
            ],
            "waiting": [{"host": "wintermute", "waiting_s": 12.5, "why": "armitage is drained by armitage: ..."}],
        },
    }
    text = "\n".join(render(motoko))
    assert "rollout (drain leases):" in text
    assert "armitage    armitage  routed out" in text or ("armitage" in text and "routed out" in text)
    assert "wintermute" in text and "waiting 12.5 s" in text
    node = {
        "host": "armitage",
        "backend": {
            "stage": "draining",
            "drain": {"stage": "waiting", "since": 1.0, "detail": "waiting for a drain lease: wintermute is drained"},
        },
    }
    assert "drain:     waiting since" in "\n".join(render(node))
