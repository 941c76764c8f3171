"""Probing a vLLM backend (the fake one, in every failure mode): ready only when /health,
/v1/models and a streamed canary all answer within the timeout; load from /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.adapters.vllm import probe_backend
from agent.core.health import BackendHealth, Check, Stage, parse_vllm_load, stage_of
from tests.fakes.fake_openai import serve_in_thread

SERVED = "Qwen/Qwen2.5-7B-Instruct-AWQ"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One fake vLLM for the module (starting and stopping one per test costs a poll each)."""
    mode = tmp_path_factory.mktemp("fake") / "mode"
    mode.write_text("ok")
    server, _thread = serve_in_thread(
        ["--host", "127.0.0.1", "--port", "0", "--served-model-name", SERVED], {"FAKE_MODE_FILE": str(mode)}
    )
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", mode
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def backend(server: tuple[str, Path]) -> Iterator[tuple[str, Path]]:
    """The shared fake, in ``ok`` mode again after each test."""
    yield server
    server[1].write_text("ok")


def test_a_healthy_backend_is_ready_with_its_load(backend: tuple[str, Path]) -> None:
    url, _ = backend
    health = probe_backend(url, SERVED, timeout_s=1.0)
    assert health.ready, health
    assert health.load.running == 0 and health.load.waiting == 0 and health.load.idle


@pytest.mark.slow  # waits on real probe timeouts
@pytest.mark.parametrize(("mode", "failed"), [("hang", "health"), ("error", "health"), ("stall", "canary")])
def test_a_hung_erroring_or_stalled_backend_is_not_ready_within_the_timeout(
    backend: tuple[str, Path], mode: str, failed: str
) -> None:
    url, mode_file = backend
    mode_file.write_text(mode)
    start = time.monotonic()
    health = probe_backend(url, SERVED, timeout_s=0.25)
    took = time.monotonic() - start
    assert not health.ready and failed in health.reason, health
    assert took < 2.5, f"a probe round must stay within its bound ({took:.1f}s)"
    mode_file.write_text("ok")


def test_a_backend_serving_another_model_is_not_ready(backend: tuple[str, Path]) -> None:
    url, _ = backend
    health = probe_backend(url, "meta-llama/Other", timeout_s=1.0)
    assert not health.ready and "not 'meta-llama/Other'" in health.reason


def test_an_unreachable_backend_is_a_failed_check_not_an_exception() -> None:
    health = probe_backend("http://127.0.0.1:9/v1", SERVED, timeout_s=0.25)
    assert not health.ready and "health" in health.reason


def test_vllm_gauges_are_summed_over_models() -> None:
    text = """# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 3.0
vllm:num_requests_running{model_name="b"} 1.0
vllm:num_requests_waiting{model_name="a"} 2.0
vllm:gpu_cache_usage_perc{model_name="a"} 0.5
"""
    load = parse_vllm_load(text)
    assert load.running == 4 and load.waiting == 2 and not load.idle
    assert parse_vllm_load("garbage").running is None


def test_stages() -> None:
    ready = BackendHealth(checks=tuple(Check(name=n, ok=True) for n in ("health", "models", "canary")))
    assert stage_of("running", "", ready) is Stage.READY
    assert stage_of("running", "INFO Loading safetensors checkpoint shards: 40%", None) is Stage.LOADING
    assert stage_of("running", "", None) is Stage.STARTING
    assert stage_of("exited", "", None) is Stage.FAILED
    assert stage_of(None, "", None, pulling=True) is Stage.PULLING
    assert stage_of("running", "", ready, draining=True) is Stage.DRAINING


def test_the_fake_counts_what_it_received(backend: tuple[str, Path]) -> None:
    url, _ = backend
    stats_url = url.removesuffix("/v1") + "/fake/stats"
    before = httpx.get(stats_url).json()["received"].get("/v1/chat/completions", 0)
    probe_backend(url, SERVED, timeout_s=1.0)
    after = httpx.get(stats_url).json()["received"]["/v1/chat/completions"]
    assert after == before + 1, "one canary per probe round"
