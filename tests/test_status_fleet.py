"""``agent status`` on motoko and on a gpu_node: the fleet, the routing in effect, the spend and
the routing events in the human form; degraded (exit 1) for a backend out of routing, a stale
or silent host, a backend not ready or failing reports. And the spend read from the proxy."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.adapters import proxy
from agent.adapters.secrets import SecretResolver
from agent.core.redact import Redactor
from agent.daemon.gateway import GatewayDuty
from agent.daemon.status import exit_code, problems, render
from agent.fleet.gateway import GatewayView
from agent.node.settings import Settings
from tests.conftest import DEMO_IDENTITY


def host(name: str, age_s: float = 3.0, **more: Any) -> dict[str, Any]:
    return {
        "host": name,
        "reported": True,
        "role": "gpu_node",
        "commit": "0123456789abcdef0123",
        "stage": "ready",
        "age_s": age_s,
        "health": "ready",
        "gpu": "1x NVIDIA H200, 60.1/140.4 GiB, 41 C",
        "load": {"running": 2.0, "waiting": 1.0},
        **more,
    }


def backend(in_routing: bool = True, why: str = "healthy", **more: Any) -> dict[str, Any]:
    b = {"in_routing": in_routing, "since": time.time() - 30, "why": why, "failures": 0, "probe": "ready"}
    return b | {"load": {"running": 1.0, "waiting": 0.0}} | more


def motoko(**changes: Any) -> dict[str, Any]:
    """A healthy motoko status, as the daemon gives it."""
    status: dict[str, Any] = {
        "host": "motoko",
        "role": "motoko",
        "running": True,
        "applied_commit": "f" * 40,
        "last_run": {"result": "converged", "time": time.time() - 5, "run_id": "abcd1234"},
        "services": [{"name": "litellm", "container": "c1", "state": "running", "health": "healthy"}],
        "routing": {
            "local/chat": {"backend": "armitage", "reason": "primary healthy", "chain": ["armitage", "openai-strong"]},
            "local/reasoner": {"backend": "wintermute", "reason": "primary healthy", "chain": ["wintermute"]},
        },
        "fleet": [host("armitage", stale=False), host("wintermute", stale=False)],
        "fleet_api": "http://0.0.0.0:8300",
        "report_interval_s": 10.0,
        "routing_state": {"backends": {"armitage": backend(), "wintermute": backend()}, "events": [], "rounds": 9},
        "spend": {"budget_usd": 150.0, "spent_usd": 37.25, "period": "1mo"},
    }
    status.update(changes)
    return status


def gpu_node(**backend_changes: Any) -> dict[str, Any]:
    own = {
        "stage": "ready",
        "backend": "ready",
        "load": {"running": 0.0, "waiting": 0.0},
        "gpu": "1x NVIDIA H200, 60.1/140.4 GiB, 41 C",
        "reporting": {
            "to": "http://motoko:8300",
            "delivered": 12,
            "attempts": 12,
            "every_s": 10.0,
            "last": {"ok": True, "status": 200, "detail": ""},
        },
    } | backend_changes
    return {
        "host": "armitage",
        "role": "gpu_node",
        "running": True,
        "applied_commit": "f" * 40,
        "last_run": {"result": "converged", "time": time.time() - 5, "run_id": "abcd1234"},
        "services": [{"name": "vllm", "container": "c1", "state": "running", "health": "healthy"}],
        "backend": own,
    }


# ---------------------------------------------------------------------- exit codes


def test_a_healthy_fleet_is_exit_0() -> None:
    assert problems(motoko()) == []
    assert exit_code(motoko()) == 0
    assert exit_code(gpu_node()) == 0


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        (
            motoko(
                routing_state={
                    "backends": {"armitage": backend(False, "3 consecutive failed probes: refused")},
                    "events": [],
                }
            ),
            "backend armitage out of routing: 3 consecutive failed probes: refused",
        ),
        (motoko(fleet=[host("armitage", age_s=95.0, stale=True)]), "host armitage report stale (95s old)"),
        # No ``stale`` flag (an older daemon): judged from the age and the report interval.
        (motoko(fleet=[host("armitage", age_s=31.0)]), "host armitage report stale (31s old)"),
        (motoko(fleet=[{"host": "wintermute", "reported": False}]), "host wintermute never reported"),
        (gpu_node(stage="loading", backend="health: 503"), "backend not ready (loading): health: 503"),
        (
            gpu_node(reporting={"delivered": 0, "attempts": 3, "last": {"ok": False, "status": 401, "detail": "bad"}}),
            "reports to motoko failing: bad",
        ),
        (
            gpu_node(reporting={"delivered": 0, "attempts": 3, "last": {"status": None, "detail": "refused"}}),
            "reports to motoko failing: refused",
        ),
    ],
)
def test_degraded_for_the_fleet(status: dict[str, Any], problem: str) -> None:
    assert problem in problems(status)
    assert exit_code(status) == 1


def test_a_report_within_three_intervals_is_not_stale() -> None:
    assert exit_code(motoko(fleet=[host("armitage", age_s=29.0)])) == 0


def test_not_running_is_still_exit_3_whatever_the_fleet() -> None:
    status = motoko(running=False)
    assert exit_code(status) == 3


# ---------------------------------------------------------------------- the human form


def test_motoko_shows_fleet_routing_spend_and_events_newest_first() -> None:
    events = [{"at": time.time() - i, "backend": f"b{i}", "change": "out", "why": f"why {i}"} for i in range(15)]
    status = motoko(
        routing={
            "local/chat": {
                "backend": "wintermute",
                "reason": "armitage down (3 consecutive failed probes): served by local/reasoner",
                "chain": ["wintermute", "openai-strong"],
            },
            "local/reasoner": {"backend": "wintermute", "reason": "primary healthy", "chain": ["wintermute"]},
        },
        fleet=[host("armitage", stale=False), {"host": "wintermute", "reported": False}],
        routing_state={
            "backends": {"armitage": backend(False, "3 consecutive failed probes: refused"), "wintermute": backend()},
            "events": events,
        },
    )
    text = "\n".join(render(status))
    assert text.splitlines()[0] == "agent on motoko (role motoko): DEGRADED"
    lines = text.splitlines()

    def row(start: str) -> str:
        return next(line for line in lines if line.startswith(start))

    header = row("  HOST ")
    armitage = row("  armitage  ")
    for column, value in (("COMMIT", "0123456789ab"), ("STAGE", "ready"), ("GPU", "1x NVIDIA H200"), ("LOAD", "2/1")):
        assert armitage.index(value) == header.index(column), f"{column} aligned"
    assert "0123456789abc" not in armitage, "commit cut to 12"
    assert row("  wintermute  -").split() == ["wintermute", "-", "-", "never", "-", "-", "-", "-"]
    chat = row("  local/chat ")
    assert "wintermute (in) > openai-strong" in chat and "armitage down" in chat
    assert row("  armitage    OUT").split()[2:4] == ["30s", "ago"]
    assert "OpenAI spend: 37.25 of 150 USD (25%) per 1mo" in text
    shown = [line.split()[2] for line in lines if line.strip().endswith(tuple(f"why {i}" for i in range(15)))]
    assert shown == [f"b{i}" for i in range(10)], "the 10 newest events, newest first"


def test_an_out_backend_still_in_the_config_is_marked_out() -> None:
    """Between the routing loop's verdict and the pass that applies it."""
    status = motoko(routing_state={"backends": {"armitage": backend(False, "probe failed")}, "events": []})
    assert "armitage (OUT) > openai-strong" in "\n".join(render(status))


@pytest.mark.parametrize(
    ("spend", "line"),
    [
        ({"budget_usd": 150, "spent_usd": None, "period": "1mo"}, "OpenAI spend: unknown"),
        (
            {"budget_usd": 150.0, "spent_usd": 151.0, "period": "1mo"},
            "OpenAI spend: 151.00 of 150 USD (101%) per 1mo; OVER BUDGET",
        ),
    ],
)
def test_spend_unknown_or_over_budget(spend: dict[str, Any], line: str) -> None:
    assert line in "\n".join(render(motoko(spend=spend)))


def test_a_gpu_node_shows_its_backend_and_its_reports() -> None:
    text = "\n".join(render(gpu_node()))
    assert "agent on armitage (role gpu_node): healthy" in text
    assert "  stage:     ready" in text and "  gpu:       1x NVIDIA H200" in text
    assert "  load:      0/0 (running/waiting)" in text
    assert "reporting: to http://motoko:8300: 12 delivered of 12; last ok" in text
    off = "\n".join(render(gpu_node(reporting=None)))
    assert "reporting: off" in off


def test_the_status_of_a_daemon_before_any_fleet_data_renders() -> None:
    """The first seconds (no report, no round yet, fleet an empty dict) and the not-running form."""
    bare = motoko(fleet={}, routing_state={"backends": {}, "events": []}, spend=None)
    assert exit_code(bare) == 0 and render(bare)
    assert render({"host": "motoko", "running": False, "not_running": "agent not running"})[0].endswith("NOT RUNNING")


# ---------------------------------------------------------------------- spend from the proxy


class Budgets:
    """A proxy answering ``GET /provider/budgets`` as LiteLLM 1.108.7 does (with the master key)."""

    def __init__(self, status: int = 200, body: Any = None, key: str = "sk-master") -> None:
        self.status, self.key, self.asked = status, key, 0
        self.body = (
            body
            if body is not None
            else {
                "providers": {
                    "openai": {"budget_limit": 150.0, "time_period": "1mo", "spend": 3.5, "budget_reset_at": "soon"}
                }
            }
        )
        budgets = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                budgets.asked += 1
                ok = self.path == "/provider/budgets" and self.headers.get("Authorization") == f"Bearer {budgets.key}"
                raw = budgets.body if isinstance(budgets.body, bytes) else json.dumps(budgets.body).encode()
                self.send_response(budgets.status if ok else 401)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def budgets() -> Iterator[Budgets]:
    b = Budgets()
    yield b
    b.close()


def test_provider_spend_reads_the_openai_budget(budgets: Budgets) -> None:
    assert proxy.provider_spend(budgets.url, "sk-master") == {
        "budget_usd": 150.0,
        "spent_usd": 3.5,
        "period": "1mo",
        "reset_at": "soon",
    }


@pytest.mark.parametrize(
    ("status", "body", "key"),
    [
        (200, {"providers": {"openai": {}}}, "sk-wrong"),  # 401
        (500, {"error": "No llm_router found"}, "sk-master"),
        (200, b"not json", "sk-master"),
        (200, {"providers": {}}, "sk-master"),  # no budget for openai
        (200, ["a list"], "sk-master"),
    ],
)
def test_provider_spend_is_none_when_the_proxy_cannot_say(status: int, body: Any, key: str) -> None:
    b = Budgets(status, body)
    try:
        assert proxy.provider_spend(b.url, key) is None
    finally:
        b.close()


def test_provider_spend_is_none_when_nothing_listens() -> None:
    assert proxy.provider_spend("http://127.0.0.1:9", "k", timeout_s=0.5) is None


def view(repo: Path, tmp: Path, url: str) -> GatewayView:
    resolver = SecretResolver.for_repo(repo, tmp / "none.yaml", DEMO_IDENTITY, lambda _: None)
    loaded = GatewayView.load(repo, "a" * 40, "motoko", resolver)
    return dataclasses.replace(loaded, proxy_url=url, master_key="sk-master")


def test_the_gateway_reads_the_spend_at_most_every_10_s(budgets: Budgets, repo: Path, tmp_path: Path) -> None:
    duty = GatewayDuty(Settings(host="motoko", state_dir=tmp_path), Redactor(), lambda: None)
    v = view(repo, tmp_path, budgets.url)
    clock = [1000.0]
    duty.spend_clock = lambda: clock[0]
    first = duty.spend(v)
    assert first == {"budget_usd": 150.0, "spent_usd": 3.5, "period": "1mo", "reset_at": "soon"}
    clock[0] += 9.0
    assert duty.spend(v) == first and budgets.asked == 1, "cached"
    clock[0] += 1.5
    budgets.close()
    later = duty.spend(v)
    assert later == {"budget_usd": 150, "spent_usd": None, "period": "1mo"}, "the budget alone, spend unknown"


@pytest.mark.slow
def test_the_real_proxy_reports_its_openai_spend_with_no_database(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_port: int
) -> None:
    """LiteLLM 1.108.7's ``/provider/budgets`` reads the router's budget limiter (Redis): the
    rendered config, no database; a paid call shows up as spend."""
    from tests.test_litellm_proxy import TOKEN, chat, start_stack

    procs = start_stack(repo, tmp_path, monkeypatch, redis_port, openai=True, budget="150")
    try:
        url = f"http://127.0.0.1:{procs['proxy'].port}"
        before = proxy.provider_spend(url, TOKEN)
        assert before is not None and before["budget_usd"] == 150.0 and before["period"] == "1mo", before
        assert proxy.provider_spend(url, "sk-wrong") is None
        assert chat(procs["proxy"].port, "openai/strong").status_code == 200
        end = time.monotonic() + 20
        after: dict[str, Any] | None = before
        while time.monotonic() < end and after is not None and after["spent_usd"] <= before["spent_usd"]:
            time.sleep(0.2)
            after = proxy.provider_spend(url, TOKEN)
        assert after is not None and after["spent_usd"] > before["spent_usd"], (before, after)
    finally:
        for p in procs.values():
            p.stop()
