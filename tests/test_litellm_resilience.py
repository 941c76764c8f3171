"""The gateway config is resilient by itself, checked on the real LiteLLM proxy (slow).

Fake vLLM servers stand in for armitage and wintermute, another fake for api.openai.com; the
config is what ``agent render`` writes for motoko. Each test keeps its load to a few seconds."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.proxykit import Proc
from tests.test_litellm_proxy import TOKEN, start_stack
from tests.test_validate import edit

pytestmark = pytest.mark.slow


def stats(p: Proc) -> int:
    """Chat completions a fake has received (probes included)."""
    r = httpx.get(f"http://127.0.0.1:{p.port}/fake/stats", timeout=5)
    return int(r.json()["received"].get("/v1/chat/completions", 0))


def ask(port: int, model: str, words: int = 3, max_tokens: int = 16) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"model": model, "messages": [{"role": "user", "content": "hello " * words}], "max_tokens": max_tokens},
        timeout=60,
    )


def warmed(port: int, model: str = "local/chat", deadline_s: float = 60) -> httpx.Response:
    """The first answer after the proxy's start. On a loaded machine a worker's first background
    health check can time out and hold every local deployment back for a few seconds (a 429);
    what the tests measure starts once the proxy answers."""
    end = time.monotonic() + deadline_s
    r = ask(port, model)
    while r.status_code != 200 and time.monotonic() < end:
        time.sleep(1)
        r = ask(port, model)
    return r


def settled(fakes: list[Proc], quiet_s: float = 2.0) -> list[int]:
    """The fakes' counts once they have not moved for ``quiet_s``."""
    last, since = [stats(p) for p in fakes], time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.2)
        now = [stats(p) for p in fakes]
        if now != last:
            last, since = now, time.monotonic()
    return last


def stop_all(procs: dict[str, Proc]) -> None:
    for p in procs.values():
        p.stop()


def wait_for(check: object, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def flushed(redis_port: int) -> int:
    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], check=True, capture_output=True)
    return redis_port


@pytest.fixture
def quiet_probes(repo: Path) -> Path:
    """Background probes once at start, then not for an hour: a test counting what reaches a
    backend sees only its own requests."""
    # A generous probe timeout: on this loaded 2-core machine a 2 s probe timed out before it
    # was even sent and took both healthy local backends out of routing.
    edit(
        repo / "fleet.yaml",
        "  failure_threshold: 3",
        "  failure_threshold: 3\n  health_interval_s: 3600\n  probe_timeout_s: 60",
    )
    return repo


def test_long_prompt_goes_to_openai_without_touching_a_local_backend(
    quiet_probes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flushed: int
) -> None:
    """10,000 tokens is over armitage's limit (8192 less the 1024 reserve) and under the fleet's
    12,000: the pre-call check sends it to the group's paid deployment, no local round trip."""
    procs = start_stack(quiet_probes, tmp_path, monkeypatch, flushed, openai=True, budget="150")
    try:
        port = procs["proxy"].port
        local = [procs["armitage"], procs["wintermute"]]
        # The start-up probe cycle reaches both local backends: wait until it is done.
        wait_for(lambda: all(stats(p) >= 1 for p in local), 60)
        before = settled(local)
        r = ask(port, "local/chat", words=10_000)
        assert r.status_code == 200, r.text
        assert "openai" in r.json()["choices"][0]["message"]["content"], r.text
        assert [stats(p) for p in local] == before, "a long prompt reached a local backend"
        short = ask(port, "local/chat", words=3)
        assert short.status_code == 200 and "armitage" in short.json()["choices"][0]["message"]["content"]
    finally:
        stop_all(procs)


def test_failing_backend_is_served_by_the_next_deployment_in_the_same_request(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flushed: int
) -> None:
    mode = tmp_path / "armitage.mode"
    mode.write_text("ok")
    procs = start_stack(repo, tmp_path, monkeypatch, flushed, fake_env={"armitage": {"FAKE_MODE_FILE": str(mode)}})
    try:
        port = procs["proxy"].port
        assert "armitage" in warmed(port).json()["choices"][0]["message"]["content"]
        mode.write_text("error")
        answered: list[str] = []
        failed: list[str] = []
        for _ in range(50):
            r = ask(port, "local/chat")
            if r.status_code != 200:
                failed.append(f"{r.status_code} {r.text[:200]}")
            else:
                answered.append(r.json()["choices"][0]["message"]["content"])
        assert failed == []
        assert all("wintermute" in a for a in answered), set(answered)
        # The 500s cooled armitage after failure_threshold: most requests did not even try it.
        assert stats(procs["armitage"]) < 25, stats(procs["armitage"])
    finally:
        stop_all(procs)


def test_config_renders_byte_identically(repo: Path, tmp_path: Path) -> None:
    from agent.cli.commands import main

    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        assert main(["render", "--host", "motoko", "--repo", str(repo), "--out", str(out)]) == 0
        outs.append((out / "config" / "config.yaml").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("over_budget", [False, True], ids=["refused", "opt-in"])
def test_long_prompt_once_the_budget_is_spent(
    quiet_probes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flushed: int, over_budget: bool
) -> None:
    """Too long for every local backend and the budget spent: by default a 429 that names both
    rules, with no local round trip; ``long_context_over_budget: true`` answers it from OpenAI."""
    if over_budget:
        edit(
            quiet_probes / "fleet.yaml",
            "  failure_threshold: 3",
            "  failure_threshold: 3\n  long_context_over_budget: true",
        )
    procs = start_stack(quiet_probes, tmp_path, monkeypatch, flushed, openai=True)  # a millionth of a dollar
    try:
        port = procs["proxy"].port
        assert "openai" in ask(port, "openai/strong").json()["choices"][0]["message"]["content"]
        assert wait_for(lambda: "armitage" in ask(port, "openai/strong").text, 15), "budget never spent"
        local = [procs["armitage"], procs["wintermute"]]
        before = settled(local)
        r = ask(port, "local/chat", words=10_000)
        assert [stats(p) for p in local] == before, "a long prompt reached a local backend"
        if over_budget:
            assert r.status_code == 200, r.text
            assert "openai" in r.json()["choices"][0]["message"]["content"]
        else:
            assert r.status_code == 429, r.text
            message = r.json()["error"]["message"]
            assert "Context Window exceeded" in message and "Max Input Tokens=7168" in message, message
            assert "Exceeded budget for provider openai" in message, message
    finally:
        stop_all(procs)


def test_hung_backend_costs_one_timeout_then_is_out_of_routing(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flushed: int
) -> None:
    """armitage accepts and never answers: the first request pays the timeout (3 s here) and is
    answered by wintermute in the same request; the timeout cools armitage, so the next ones
    go straight to wintermute (measured: 3.1 s, then p50 95 ms). Zero failed requests."""
    edit(repo / "fleet.yaml", "  failure_threshold: 3", "  failure_threshold: 3\n  timeout_s: 3\n  stream_timeout_s: 3")
    mode = tmp_path / "armitage.mode"
    mode.write_text("ok")
    procs = start_stack(repo, tmp_path, monkeypatch, flushed, fake_env={"armitage": {"FAKE_MODE_FILE": str(mode)}})
    try:
        port = procs["proxy"].port
        assert "armitage" in warmed(port).text
        mode.write_text("hang")
        latencies, failed = [], []
        end = time.monotonic() + 10
        while time.monotonic() < end:
            t0 = time.monotonic()
            r = ask(port, "local/chat")
            latencies.append(time.monotonic() - t0)
            if r.status_code != 200 or "wintermute" not in r.text:
                failed.append(f"{r.status_code} {r.text[:200]}")
        assert failed == []
        later = sorted(latencies[1:])
        assert later and later[len(later) // 2] < 0.5, latencies
        mode.write_text("ok")  # lets the hung requests go
    finally:
        stop_all(procs)
