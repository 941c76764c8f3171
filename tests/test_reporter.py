"""The node reporter against a real fleet API on 127.0.0.1: reports arrive, ``changed()`` sends
soon, an outage keeps only the newest and delivers it once motoko is back, a refused report is
not retried in a tight loop, and nothing blocks the caller (not even a server that hangs)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from agent.adapters.fleetclient import HttpxSender, Sent
from agent.core.gpu import GpuFacts
from agent.core.health import BackendHealth, Check, Load, Stage
from agent.fleet.api import FleetApi
from agent.node.reporter import Reporter, ReportFields, build_report, judged
from tests.fleetkit import fleet_api

# Real sockets and real waits (intervals, backoff): ~3 s, so it runs with the slow tests in CI.
pytestmark = pytest.mark.slow

TOKENS = {"gpu-1": "tok-gpu-1-secret", "gpu-2": "tok-gpu-2-secret"}
READY = BackendHealth(
    checks=(Check(name="health", ok=True), Check(name="models", ok=True), Check(name="canary", ok=True)),
    load=Load(running=2, waiting=0),
)
GPU = GpuFacts(status="unknown", reason="nvidia-ml-py is not installed")


def fields(stage: Stage = Stage.READY, commit: str = "0123abc") -> ReportFields:
    return ReportFields(
        role="gpu_node", stage=stage, commit=commit, health=READY, gpu=GPU, services={"vllm": "running"}
    )


_sender: list[HttpxSender] = []


@pytest.fixture(autouse=True, scope="module")
def _one_sender() -> Iterator[None]:
    """One sender (one httpx client) for the module: each new one loads the CA bundle (80 ms)."""
    sender = HttpxSender(timeout_s=0.3)
    _sender.append(sender)
    yield
    sender.close()
    _sender.clear()


class Counting:
    """The real sender, counting attempts and what they answered."""

    def __init__(self) -> None:
        self.results: list[Sent] = []

    def __call__(self, url: str, token: str, body: bytes) -> Sent:
        result = _sender[0](url, token, body)
        self.results.append(result)
        return result


@contextmanager
def reporter(url: str, token: str = "tok-gpu-1-secret", **kwargs: Any) -> Iterator[Reporter]:
    options: dict[str, Any] = {"interval_s": 0.1, "debounce_s": 0.01, "backoff_s": 0.02, "max_backoff_s": 0.1}
    options.update(kwargs)
    options.setdefault("send", Counting())
    r = Reporter(url, "gpu-1", token, **options)
    r.start()
    try:
        yield r
    finally:
        assert r.stop()


def fleet_host(api: FleetApi, name: str = "gpu-1") -> dict[str, Any]:
    hosts: list[dict[str, Any]] = _sender[0].client.get(f"{api.url}/v1/fleet").json()["hosts"]
    return next(h for h in hosts if h["host"] == name)


def until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> float:
    """Seconds it took for ``predicate`` to hold (fails the test after ``timeout_s``)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "timed out waiting"
        time.sleep(0.005)
    return time.monotonic() - start


def test_build_report_is_the_report_motoko_takes() -> None:
    report = build_report("gpu-1", fields(), boot_id="ab" * 8, seq=3, sent_at=1_800_000_000.0)
    assert report.host == "gpu-1" and report.stage is Stage.READY and report.seq == 3
    assert report.health is not None and report.health.ready and report.services == {"vllm": "running"}


def test_judged_takes_the_stage_from_container_log_and_probe() -> None:
    probed, unprobed = ReportFields(role="gpu_node", health=READY), ReportFields(role="gpu_node")
    loading = judged(unprobed, "running", "INFO Loading safetensors checkpoint shards")
    assert loading.stage is Stage.LOADING and loading.role == "gpu_node"
    assert judged(probed, "running", "").stage is Stage.READY
    assert judged(probed, "exited", "").stage is Stage.FAILED
    assert judged(probed, "running", "", draining=True).stage is Stage.DRAINING


def test_backoff_doubles_up_to_its_cap_with_jitter_of_up_to_half() -> None:
    def backoffs(jitter: float) -> list[float]:
        r = Reporter(
            "http://motoko", "gpu-1", "tok", send=Counting(), backoff_s=1, max_backoff_s=60, rng=lambda: jitter
        )
        return [r._backoff(n) for n in (1, 2, 3, 6, 7, 100)]

    assert backoffs(1.0) == [1, 2, 4, 32, 60, 60]
    assert backoffs(0.0) == [0.5, 1, 2, 16, 30, 30]


def test_reports_arrive_and_show_in_the_fleet_view(tmp_path: Path) -> None:
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS) as api, reporter(api.url) as r:
        r.update(fields())
        until(lambda: r.delivered >= 2)  # the first at once, the next one interval later
        view = fleet_host(api)
    assert view["reported"] and view["stage"] == "ready" and view["commit"] == "0123abc"
    assert view["ready"] is True and view["load"] == {"running": 2, "waiting": 0}
    assert view["boot_id"] == r.boot_id and view["seq"] == r.seq and view["reports"] >= 2


def test_changed_sends_within_a_fraction_of_the_interval(tmp_path: Path) -> None:
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS) as api, reporter(api.url, interval_s=5.0) as r:
        r.update(fields())
        until(lambda: r.delivered == 1)
        r.update(fields(Stage.DRAINING))
        r.changed()
        took = until(lambda: fleet_host(api)["stage"] == "draining")
    assert took < 0.5 and r.delivered == 2  # the interval is 5 s


def test_while_motoko_is_down_only_the_newest_is_kept_and_delivered_once_it_is_back(tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    send = Counting()
    with fleet_api(db, TOKENS) as api, reporter(api.url, send=send) as r:
        port = api.address[1]
        r.update(fields(commit="1111111"))
        until(lambda: r.delivered == 1)
        api.close()  # motoko goes down
        for n in range(200):  # the reconcile pass keeps updating: one slot, nothing queued
            r.update(fields(commit=f"{n:07x}"))
            r.changed()
        r.update(fields(Stage.DRAINING, commit="2222222"))
        time.sleep(0.3)  # backoff 20, 40, 80, 100, 100 ms (jittered): a handful of tries
        failed_at = len(send.results)
        with fleet_api(db, TOKENS, port=port) as back:  # motoko back on the same port and database
            until(lambda: fleet_host(back)["commit"] == "2222222")
            view = fleet_host(back)
    unreachable = [s for s in send.results if s.status is None]
    assert unreachable and all("\n" not in s.detail for s in unreachable)
    assert 3 <= failed_at <= 12  # backed off, not a tight loop (and not one try per update)
    assert view["stage"] == "draining" and view["reports"] == 2  # the newest, and only it


def test_a_new_motoko_address_takes_effect_at_the_next_attempt(tmp_path: Path) -> None:
    with fleet_api(tmp_path / "a.sqlite", TOKENS) as old, reporter(old.url) as r:
        r.update(fields())
        until(lambda: r.delivered == 1)
        with fleet_api(tmp_path / "b.sqlite", TOKENS) as new:
            r.set_url(new.url)
            until(lambda: fleet_host(new)["reported"])


def test_a_wrong_token_is_refused_logged_once_and_not_retried_in_a_tight_loop(tmp_path: Path) -> None:
    send = Counting()
    with capture_logs() as logs, fleet_api(tmp_path / "fleet.sqlite", TOKENS) as api:
        with reporter(api.url, token="tok-wrong", send=send, interval_s=0.1, max_backoff_s=0.01) as r:
            r.update(fields())
            for _ in range(15):
                r.changed()
                time.sleep(0.02)
            attempts = len(send.results)
        view = fleet_host(api)
    assert 1 <= attempts <= 5  # 0.3 s at no faster than the 0.1 s interval, though backoff is 10 ms
    assert all(s.status == 401 for s in send.results)
    warned = [e for e in logs if e["log_level"] == "warning" and e["event"] == "report refused"]
    assert len(warned) == 1 and "unknown token" in warned[0]["reason"]
    assert view == {"host": "gpu-1", "reported": False}


def test_a_rotated_token_is_used_at_once(tmp_path: Path) -> None:
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS) as api, reporter(api.url, token="tok-old", interval_s=5.0) as r:
        r.update(fields())
        until(lambda: r.last_result is not None and r.last_result.status == 401)
        r.set_token("tok-gpu-1-secret")
        took = until(lambda: r.delivered == 1)
    assert took < 0.5


@pytest.fixture
def hung_server() -> Iterator[str]:
    """A socket that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not done.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    done.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_update_never_blocks_while_motoko_hangs_and_stop_is_prompt(hung_server: str) -> None:
    send = Counting()
    with capture_logs() as logs:
        r = Reporter(hung_server, "gpu-1", "tok", interval_s=0.05, send=send, debounce_s=0.0, backoff_s=0.01)
        r.start()
        slowest = 0.0
        deadline = time.monotonic() + 0.35
        while time.monotonic() < deadline:
            start = time.monotonic()
            r.update(fields())
            r.changed()
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.002)
        start = time.monotonic()
        assert r.stop()
        stopped_in = time.monotonic() - start
    assert slowest < 0.02 and stopped_in < 1.0
    assert send.results and all(s == Sent(None, "timed out") for s in send.results)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["motoko unreachable"]


def test_stop_is_prompt_while_waiting_for_the_next_interval(tmp_path: Path) -> None:
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS) as api:
        r = Reporter(api.url, "gpu-1", "tok-gpu-1-secret", interval_s=60, send=Counting(), debounce_s=0.0)
        r.start()
        r.update(fields())
        until(lambda: r.delivered == 1)
        start = time.monotonic()
        assert r.stop()
    assert time.monotonic() - start < 0.2


def test_each_run_draws_its_own_boot_id_and_its_seq_grows(tmp_path: Path) -> None:
    structlog.reset_defaults()
    with fleet_api(tmp_path / "fleet.sqlite", TOKENS) as api:
        with reporter(api.url) as first:
            first.update(fields())
            until(lambda: first.delivered == 2)
        with reporter(api.url) as second:  # the agent restarted: a new run, seq starts over
            second.update(fields())
            until(lambda: second.delivered == 1)
        view = fleet_host(api)
    assert first.boot_id != second.boot_id and view["boot_id"] == second.boot_id
    assert view["boots"] == 2 and view["seq"] == second.seq


def test_fields_motoko_would_refuse_are_logged_once_and_reporting_goes_on(tmp_path: Path) -> None:
    send = Counting()
    db = tmp_path / "fleet.sqlite"
    with capture_logs() as logs, fleet_api(db, TOKENS) as api, reporter(api.url, send=send, interval_s=0.05) as r:
        r.update(ReportFields(role="", stage=Stage.READY))
        until(lambda: r.attempts >= 2)
        assert send.results == []  # never sent
        r.update(fields())
        until(lambda: r.delivered == 1)
    warned = [e for e in logs if e["log_level"] == "warning"]
    assert len(warned) == 1 and warned[0]["reason"].startswith("not a valid report: role:")


def test_a_reporter_stopped_before_it_started_closes_its_client() -> None:
    r = Reporter("http://127.0.0.1:9", "gpu-1", "tok")
    assert r.stop()
    assert isinstance(r._send, HttpxSender) and r._send.client.is_closed
