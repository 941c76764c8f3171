"""The daemons' fleet duties wired end to end through the public fakes (no Docker, no proxy):

- motoko: after its first good pass the fleet API answers on the port of the desired state and
  takes only reports signed with the reporting host's own token; the routing loop (driven here
  round by round) takes a failing backend out, the pass it triggers renders the proxy config
  without it and reloads the proxy in place (never a restart), and good probes put it back;
- a gpu_node: its node duty reports stage and commit to a fleet API.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.adapters.secrets import SecretResolver
from agent.adapters.systemd import Notifier
from agent.core.health import BackendHealth, Check, Load
from agent.core.outcomes import PassOutcome
from agent.daemon.gateway import GatewayDuty
from agent.daemon.node import NodeDuty
from agent.daemon.service import Daemon, Duties
from agent.daemon.status import exit_code, problems
from agent.fleet.gateway import Target
from agent.node.reconcile import PassResult
from agent.node.settings import Settings
from agent.node.state import StateStore
from agent.testing.fakes import FakeClock, FakeEngine, FakeSource
from tests.conftest import DEMO_IDENTITY, fake_settings
from tests.fleetkit import fleet_api
from tests.test_fleet_report import report_data

A, B = "a" * 40, "b" * 40
GOOD = BackendHealth(
    checks=(Check(name="health", ok=True), Check(name="models", ok=True), Check(name="canary", ok=True)),
    load=Load(running=1, waiting=0),
)
#: Threads the duties start; none may outlive ``daemon.close()``.
DUTY_THREADS = ("routing", "fleet-api", "reporter", "node-health", "probe")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(repo: Path, tmp: Path, host: str) -> str:
    resolver = SecretResolver.for_repo(repo, tmp / "none.yaml", DEMO_IDENTITY, lambda _: None)
    return resolver.value(f"report_token_{host}")


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    yield
    end = time.monotonic() + 3
    while time.monotonic() < end:
        left = [t.name for t in threading.enumerate() if t.name.startswith(DUTY_THREADS)]
        if not left:
            return
        time.sleep(0.05)
    raise AssertionError(f"threads left running: {left}")


class FakeProxy:
    """What the agent asks of the LiteLLM proxy: readiness, the deployment ids it serves (those
    of the config on disk: a reload that took), and the provider budgets."""

    def __init__(self, port: int, config: Path, spend: float = 12.5) -> None:
        self.config, self.spend = config, spend
        self.asked: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.asked.append(self.path)
                status, body = proxy.answer(self.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def answer(self, path: str) -> tuple[int, Any]:
        if path == "/health/readiness":
            return 200, {"status": "connected"}
        if path == "/v1/model/info":
            models = yaml.safe_load(self.config.read_text())["model_list"]
            return 200, {"data": [{"model_info": {"id": m["model_info"]["id"]}} for m in models]}
        if path == "/provider/budgets":
            budget = {"budget_limit": 150.0, "time_period": "1mo", "spend": self.spend, "budget_reset_at": None}
            return 200, {"providers": {"openai": budget}}
        return 404, {"error": path}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Motoko:
    """A motoko daemon over fakes; its gateway duty probes with ``probe`` (backends in
    ``failing`` fail) and its trigger is recorded (the test runs the pass itself)."""

    def __init__(self, tmp: Path, repo: Path) -> None:
        self.tmp, self.repo = tmp, repo
        self.api_port, self.proxy_port = free_port(), free_port()
        motoko = repo / "hosts" / "motoko.yaml"
        motoko.write_text(motoko.read_text().replace("litellm_port: 8000", f"litellm_port: {self.proxy_port}"))
        append(motoko, f"  fleet_api_bind: 127.0.0.1\n  fleet_api_port: {self.api_port}\n")
        # No damping (a change is one reload at once); the loop's own thread runs one round at
        # its start and then waits: the test drives the rounds with tick().
        append(repo / "fleet.yaml", "  damping_s: 0\n  watch_interval_s: 600\n")
        self.failing: set[str] = set()
        self.probed: list[str] = []
        self.triggers = 0
        #: the proxy check's deadline: short where no proxy answers, long where one does
        self.serve_deadline_s = 0.5
        self.engine = FakeEngine(any_image=True)
        self.source = FakeSource()
        self.settings = fake_settings("motoko", tmp, repo)
        self.daemon = Daemon(
            self.settings,
            notifier=Notifier({}),
            engine_factory=lambda: self.engine,
            source=self.source,
            clock=FakeClock(),
            duties=Duties(gateway=self.gateway_duty, node=None),
        )

    def gateway_duty(self, settings: Settings, redactor: Any, trigger: Callable[[], object]) -> GatewayDuty:
        duty = GatewayDuty(settings, redactor, self.trigger, probe=self.probe, serve_deadline_s=self.serve_deadline_s)
        duty.ready_window_s = 1.0  # no proxy answers here: do not wait 30 s to say so
        return duty

    def trigger(self) -> None:
        self.triggers += 1

    def probe(self, target: Target, timeout_s: float) -> BackendHealth:
        self.probed.append(target.name)
        return BackendHealth.failed("connection refused (fake)") if target.name in self.failing else GOOD

    @property
    def gateway(self) -> GatewayDuty:
        assert self.daemon.gateway is not None
        return self.daemon.gateway

    def first_pass(self) -> PassResult:
        self.source.push(A, self.repo)
        result = self.daemon.one_pass()
        assert result is not None and result.result is PassOutcome.CONVERGED, result and result.error
        loop = self.gateway.loop
        assert loop is not None
        end = time.monotonic() + 5
        while loop.rounds < 1 and time.monotonic() < end:  # the thread's own first round
            time.sleep(0.01)
        assert loop.rounds >= 1
        return result

    def tick(self) -> dict[str, Any] | None:
        assert self.gateway.loop is not None
        return self.gateway.loop.tick()

    def config(self) -> str:
        return (StateStore(self.settings.state_dir).stack_dir("motoko") / "config" / "config.yaml").read_text()

    def litellm(self) -> str:
        [cid] = [c.id for c in self.engine.containers.values() if c.name == "litellm"]
        return cid


@pytest.fixture
def motoko(tmp_path: Path, repo: Path) -> Iterator[Motoko]:
    m = Motoko(tmp_path, repo)
    try:
        yield m
    finally:
        m.daemon.close()


def test_the_fleet_api_answers_and_takes_only_reports_signed_by_their_own_host(motoko: Motoko, tmp_path: Path) -> None:
    motoko.first_pass()
    url = f"http://127.0.0.1:{motoko.api_port}"
    armitage, wintermute = token(motoko.repo, tmp_path, "armitage"), token(motoko.repo, tmp_path, "wintermute")
    body = report_data(host="armitage", commit="abcdef0", sent_at=time.time())
    with httpx.Client(timeout=5, trust_env=False) as http:
        hosts = {h["host"]: h for h in http.get(f"{url}/v1/fleet").json()["hosts"]}
        assert set(hosts) == {"armitage", "wintermute"}
        assert hosts["armitage"] == {"host": "armitage", "reported": False}
        forged = http.post(f"{url}/v1/reports", json=body, headers={"Authorization": f"Bearer {wintermute}"})
        assert forged.status_code == 403, forged.text
        assert not http.get(f"{url}/v1/fleet").json()["hosts"][0]["reported"], "a refused report changes nothing"
        ok = http.post(f"{url}/v1/reports", json=body, headers={"Authorization": f"Bearer {armitage}"})
        assert ok.status_code == 200, ok.text
    status = motoko.daemon.status()
    [seen] = [h for h in status["fleet"] if h["host"] == "armitage"]
    assert seen["reported"] and seen["commit"] == "abcdef0" and seen["stage"] == "ready" and not seen["stale"]
    assert status["fleet_api"] == url
    # wintermute never reported: degraded, and said so.
    assert exit_code(status) == 1
    assert "host wintermute never reported" in problems(status)


def test_the_fleet_api_takes_reports_while_the_first_pass_still_waits_for_the_proxy(
    motoko: Motoko, tmp_path: Path
) -> None:
    """The gateway's first pass waits for the proxy to be healthy (half a minute on two
    cores); the nodes report meanwhile, not after it (the demo came up 30 s later for it)."""
    release = threading.Event()

    def slow_proxy(name: str) -> None:
        if name == "litellm":
            release.wait(10)

    motoko.engine.on("create", slow_proxy)
    motoko.source.push(A, motoko.repo)
    first = threading.Thread(target=motoko.daemon.one_pass)
    first.start()
    try:
        url = f"http://127.0.0.1:{motoko.api_port}"
        body = report_data(host="armitage", commit="abcdef0", sent_at=time.time())
        answer = None
        end = time.monotonic() + 5
        while answer is None and time.monotonic() < end:
            try:
                answer = httpx.post(
                    f"{url}/v1/reports",
                    json=body,
                    headers={"Authorization": f"Bearer {token(motoko.repo, tmp_path, 'armitage')}"},
                    timeout=5,
                    trust_env=False,
                )
            except httpx.ConnectError:
                time.sleep(0.05)
        assert first.is_alive(), "the pass is still creating the proxy"
        assert answer is not None and answer.status_code == 200, answer and answer.text
    finally:
        release.set()
        first.join(10)
    assert motoko.daemon.last is not None and motoko.daemon.last.result is PassOutcome.CONVERGED


def test_a_failing_backend_leaves_the_routing_by_a_reload_and_comes_back(motoko: Motoko) -> None:
    proxy = FakeProxy(motoko.proxy_port, motoko.tmp / "state" / "stacks" / "motoko" / "config" / "config.yaml")
    motoko.serve_deadline_s = 20.0
    try:
        motoko.first_pass()
        assert "local/chat@armitage" in motoko.config()
        litellm = motoko.litellm()

        motoko.failing = {"armitage"}
        assert motoko.tick() is None and motoko.tick() is None, "out only after three failed probes"
        health = motoko.tick()
        assert health is not None and not health["armitage"].healthy and health["wintermute"].healthy
        assert motoko.triggers == 1, "a changed health map asks for one pass"

        calls = len(motoko.engine.calls)
        result = motoko.daemon.one_pass()
        assert result is not None and result.result is PassOutcome.CONVERGED, result and result.error
        config = motoko.config()
        assert "local/chat@armitage" not in config and "local/chat@wintermute" in config
        assert result.routing["local/chat"]["backend"] == "wintermute"
        assert result.routing["local/chat"]["chain"][0] == "wintermute"
        ops = motoko.engine.calls[calls:]
        assert ("signal", litellm) in ops, "reloaded in place (a rolling worker reload)"
        assert not [op for op in ops if op[0] in ("restart", "create", "remove", "stop")], ops
        assert motoko.litellm() == litellm
        status = motoko.daemon.status()
        assert status["last_reload_check"]["ok"] is True, status["last_reload_check"]
        assert not status["routing_state"]["backends"]["armitage"]["in_routing"]
        assert status["routing_state"]["events"][0]["backend"] == "armitage"
        assert status["routing_state"]["events"][0]["change"] == "out"
        assert exit_code(status) == 1
        assert any(
            p.startswith("backend armitage out of routing: 3 consecutive failed probes") for p in problems(status)
        )
        assert status["spend"] == {"budget_usd": 150.0, "spent_usd": 12.5, "period": "1mo"}
        metrics = httpx.get(f"http://127.0.0.1:{motoko.api_port}/metrics", timeout=5).text
        assert 'llm_routing_backend_in{backend="armitage"} 0.0' in metrics, metrics
        assert 'llm_routing_backend_in{backend="wintermute"} 1.0' in metrics
        assert 'llm_routing_probe_failures_total{backend="armitage"} 3.0' in metrics
        assert "llm_routing_changes_total 1.0" in metrics

        motoko.failing = set()
        assert motoko.tick() is None, "back only after two good probes"
        back = motoko.tick()
        assert back is not None and back["armitage"].healthy
        assert motoko.triggers == 2
        again = motoko.daemon.one_pass()
        assert again is not None and again.result is PassOutcome.CONVERGED, again and again.error
        assert "local/chat@armitage" in motoko.config()
        assert again.routing["local/chat"]["backend"] == "armitage"
        assert not [op for op in motoko.engine.calls if op[0] == "restart"]
        status = motoko.daemon.status()
        assert status["routing_state"]["events"][0]["change"] == "in"
        assert not any("out of routing" in p for p in problems(status))
    finally:
        proxy.close()


def test_a_drain_takes_the_backend_out_by_a_reload_and_holds_its_chain_until_it_is_back(
    motoko: Motoko, tmp_path: Path
) -> None:
    """armitage asks for a drain: out of routing by one reload (never a restart), told so once
    the proxy serves without it; wintermute (same chain) waits until armitage is back in."""
    proxy = FakeProxy(motoko.proxy_port, motoko.tmp / "state" / "stacks" / "motoko" / "config" / "config.yaml")
    motoko.serve_deadline_s = 20.0
    url = f"http://127.0.0.1:{motoko.api_port}/v1/drains"
    armitage = {"Authorization": f"Bearer {token(motoko.repo, tmp_path, 'armitage')}"}
    wintermute = {"Authorization": f"Bearer {token(motoko.repo, tmp_path, 'wintermute')}"}
    try:
        motoko.first_pass()
        litellm = motoko.litellm()
        with httpx.Client(timeout=5, trust_env=False) as http:
            granted = http.post(url, json={"reason": "vllm: model changed"}, headers=armitage)
            assert granted.status_code == 200 and granted.json()["routed_out"] is False, granted.text
            health = motoko.tick()
            assert health is not None and not health["armitage"].healthy, "out at the next round"
            assert motoko.triggers == 1
            result = motoko.daemon.one_pass()
            assert result is not None and result.result is PassOutcome.CONVERGED, result and result.error
            assert "local/chat@armitage" not in motoko.config()
            assert http.post(url, json={}, headers=armitage).json()["routed_out"] is True
            assert motoko.litellm() == litellm and not [op for op in motoko.engine.calls if op[0] == "restart"]
            waits = http.post(url, json={}, headers=wintermute)
            assert waits.status_code == 409 and "armitage is drained by armitage" in waits.json()["error"]
            status = motoko.daemon.status()
            assert [lease["host"] for lease in status["drains"]["leases"]] == ["armitage"]
            assert status["drains"]["leases"][0]["state"] == "routed out"
            assert [w["host"] for w in status["drains"]["waiting"]] == ["wintermute"]

            assert http.delete(url, headers=armitage).json()["released"] is True
            # Given back, armitage is still out until the loop has seen it good again: wintermute waits.
            still = http.post(url, json={}, headers=wintermute)
            assert still.status_code == 409 and "armitage is out of routing (drained)" in still.json()["error"]
            back = motoko.tick() or motoko.tick()
            assert back is not None and back["armitage"].healthy
            assert http.post(url, json={}, headers=wintermute).status_code == 200
    finally:
        proxy.close()


def test_with_no_proxy_answering_a_reload_restarts_it_once_and_never_again(motoko: Motoko) -> None:
    """No proxy listens (the fakes run no LiteLLM): the check after the reload fails and finds
    the proxy not ready, so it restarts the proxy once for that reload; passes with nothing to
    reload do not check, so do not restart again (no restart loop)."""
    motoko.first_pass()
    litellm = motoko.litellm()
    assert "last_reload_check" not in motoko.daemon.status(), "nothing reloaded yet: nothing checked"
    motoko.failing = {"armitage"}
    for _ in range(3):
        motoko.tick()
    assert motoko.triggers == 1
    motoko.daemon.one_pass()
    assert motoko.engine.ops("restart") == [litellm]
    status = motoko.daemon.status()
    assert status["last_reload_check"]["ok"] is False
    assert status["spend"] == {"budget_usd": 150, "spent_usd": None, "period": "1mo"}, "spend unknown"
    for _ in range(2):
        result = motoko.daemon.one_pass()
        assert result is not None and result.changed() == 0
    assert motoko.engine.ops("restart") == [litellm], "no restart without a reload"
    assert motoko.gateway.reloads == 1


def armitage_daemon(tmp: Path, repo: Path, motoko_url: str, engine: FakeEngine, source: FakeSource) -> Daemon:
    """armitage's daemon over the fakes, reporting to ``motoko_url`` (a short backend probe)."""
    return Daemon(
        fake_settings("armitage", tmp, repo, motoko_url=motoko_url),
        notifier=Notifier({}),
        engine_factory=lambda: engine,
        source=source,
        clock=FakeClock(),
        duties=Duties(gateway=None, node=lambda s, r: NodeDuty(s, r, probe_timeout_s=0.5)),
    )


def test_a_gpu_node_reports_its_stage_and_commit_to_motoko(tmp_path: Path, repo: Path) -> None:
    # Its vLLM is probed on the published port: a free one, where nothing answers.
    append(repo / "hosts" / "armitage.yaml", f"  vllm_published_port: {free_port()}\n")
    engine, source = FakeEngine(any_image=True), FakeSource()
    source.push(B, repo)
    tokens = {h: token(repo, tmp_path, h) for h in ("armitage", "wintermute")}
    with fleet_api(tmp_path / "fleet.db", tokens) as api:
        daemon = armitage_daemon(tmp_path, repo, api.url, engine, source)
        try:
            result = daemon.one_pass()
            assert result is not None and result.result is PassOutcome.CONVERGED, result and result.error
            end = time.monotonic() + 10
            while time.monotonic() < end and not daemon.status()["backend"].get("reporting", {}).get("delivered"):
                time.sleep(0.02)  # the reporter counts a delivery once motoko has answered
            [record] = api.store.hosts()
            status = daemon.status()
            # An unreachable motoko is retried at least once per report interval, never backed
            # off further (a motoko starting hears from every node within an interval).
            assert daemon.node is not None and daemon.node.reporter is not None
            assert daemon.node.reporter.max_backoff_s == daemon.node.reporter.interval_s
        finally:
            daemon.close()
    assert record.report.host == "armitage" and record.report.commit == B
    backend = status["backend"]
    assert record.report.stage.value == backend["stage"] != "ready", "nothing serves: not ready"
    assert backend["reporting"]["delivered"] >= 1 and backend["reporting"]["last"]["ok"] is True
    assert exit_code(status) == 1 and any(
        p.startswith(f"backend not ready ({backend['stage']})") for p in problems(status)
    )


def test_the_fleet_page_reads_the_gateway_status_over_the_fleet_api(motoko: Motoko) -> None:
    motoko.first_pass()
    url = f"http://127.0.0.1:{motoko.api_port}"
    with httpx.Client(timeout=5, trust_env=False) as http:
        page = http.get(f"{url}/")
        view = http.get(f"{url}/v1/view").json()
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    status = motoko.gateway.status()
    assert [h["host"] for h in view["fleet"]] == [h["host"] for h in status["fleet"]] == ["armitage", "wintermute"]
    assert set(view["routing_state"]["backends"]) == set(status["routing_state"]["backends"]) != set()
    assert view["spend"]["budget_usd"] == status["spend"]["budget_usd"] and view["now"] > 0


def test_a_gpu_node_whose_pass_fails_tells_motoko_why_and_clears_it_once_a_pass_converges(
    tmp_path: Path, repo: Path
) -> None:
    """A bad push (here a host file that does not parse): the node keeps running what it ran and
    its next report, sent at once, carries the failure with file:line; motoko's fleet view and
    ``agent status`` problems show it; a good pass clears it."""
    append(repo / "hosts" / "armitage.yaml", f"  vllm_published_port: {free_port()}\n")
    bad = tmp_path / "bad"
    shutil.copytree(repo, bad)
    host_file = bad / "hosts" / "armitage.yaml"
    host_file.write_text(host_file.read_text().replace("serves: [local/chat]", "serves: [local/chat"))
    engine, source = FakeEngine(any_image=True), FakeSource()
    source.push(B, repo)
    tokens = {h: token(repo, tmp_path, h) for h in ("armitage", "wintermute")}

    def seen(api: Any, check: Callable[[Any], bool]) -> Any:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            records = [r for r in api.store.hosts() if r.report.host == "armitage"]
            if records and check(records[0].report):
                return records[0].report
            time.sleep(0.02)
        raise AssertionError(f"motoko never saw it: {[r.report for r in api.store.hosts()]}")

    with fleet_api(tmp_path / "fleet.db", tokens) as api:
        daemon = armitage_daemon(tmp_path, repo, api.url, engine, source)
        try:
            assert (first := daemon.one_pass()) is not None and first.error is None, first and first.error
            seen(api, lambda r: r.commit == B and r.problem is None)
            running = dict(engine.by_name())
            source.push(A, bad)
            failed = daemon.one_pass()
            assert failed is not None and failed.error, "the broken host file fails the pass"
            report = seen(api, lambda r: r.problem is not None)
            hosts = httpx.get(f"{api.url}/v1/fleet", timeout=5, trust_env=False).json()["hosts"]
            source.push(B, repo)
            assert (again := daemon.one_pass()) is not None and again.error is None, again and again.error
            cleared = seen(api, lambda r: r.problem is None)
        finally:
            daemon.close()
    assert report.problem.startswith(f"last pass on {A[:12]} failed (desired-state): "), report.problem
    assert "hosts/armitage.yaml:" in report.problem, report.problem
    assert report.commit == B, "what runs is still the last good commit"
    assert engine.by_name() == running, "nothing running was touched by the bad push"
    assert cleared.commit == B
    [view] = [h for h in hosts if h["host"] == "armitage"]
    assert view["problem"] == report.problem, "motoko's fleet view shows it"
    assert f"host armitage: {report.problem}" in problems({"fleet": hosts})
