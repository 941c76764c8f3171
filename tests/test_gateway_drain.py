"""A planned deploy of a GPU backend drops no request (slow: the real proxy, no Docker).

The real LiteLLM proxy (1.108.7, gunicorn, Redis) on the config the agent renders, fake vLLM
processes (armitage streams a token every 0.1 s), the motoko agent's routing loop and drain
desk (``tests.gatewaykit.ProcessGateway(drains=True)``: leases over HTTP, in SQLite), and
armitage's side of the drain as its agent runs it (``agent.node.drain.FleetDrain``). Under
10 requests/s to ``local/chat`` with three minute-long streams in flight, armitage is drained,
stopped, "loads its new model" and starts again: nothing fails, the streams complete, and
armitage is back in routing once its new model answers. The proxy master is never restarted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gatewaykit import Load, ProcessGateway, failed, pct, stream_chat, wait_until
from tests.proxykit import Proc, start_fake
from tests.test_litellm_proxy import TOKEN, start_stack
from tests.test_litellm_resilience import stop_all

pytestmark = [pytest.mark.slow]
SLOW_TOKENS = {"FAKE_TOKEN_DELAY_S": "0.1"}
#: armitage "loads its new model" this long (its port closed meanwhile)
LOAD_S = 5.0


@pytest.fixture
def stack(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_port: int) -> Iterator[dict[str, Proc]]:
    procs = start_stack(repo, tmp_path, monkeypatch, redis_port, fake_env={"armitage": SLOW_TOKENS}, gunicorn=True)
    yield procs
    stop_all(procs)


def test_a_drained_redeploy_of_armitage_under_load_drops_nothing(
    repo: Path, tmp_path: Path, stack: dict[str, Proc]
) -> None:
    said: list[str] = []
    gw = ProcessGateway(repo, tmp_path / "rendered" / "config" / "config.yaml", stack["proxy"], TOKEN, drains=True)
    gw.start()
    port = stack["armitage"].port
    api_base = f"http://127.0.0.1:{port}/v1"
    served = "Qwen/Qwen2.5-7B-Instruct-AWQ"
    streams: list[dict[str, Any]] = [{} for _ in range(3)]
    threads = [threading.Thread(target=stream_chat, args=(stack["proxy"].port, TOKEN, 600, s)) for s in streams]
    load = Load(stack["proxy"].port, TOKEN).start()
    try:
        for t in threads:
            t.start()
        time.sleep(3)
        began = time.monotonic()
        gate = gw.drain_gate("armitage", api_base, served, say=said.append)
        with gate("vllm", "model changed"):
            drained = time.monotonic()
            assert gw.api is not None and gw.api.drains.drained_backends() == {"armitage"}
            assert any("drained in" in line for line in said), said  # vLLM had nothing left in flight
            stack["armitage"].stop()
            time.sleep(LOAD_S)
            stack["armitage"] = start_fake(
                tmp_path,
                "armitage",
                served,
                env=SLOW_TOKENS,
                port=port,
                extra=["--model", "Qwen/Qwen2.5-14B-Instruct-AWQ"],
            )
        released = time.monotonic()
        assert wait_until(lambda: gw.in_since("armitage", released) is not None, 60), gw.reloads
        back = gw.in_since("armitage", released)
        time.sleep(3)
    finally:
        outcomes = load.stop()
        gw.stop()
        for t in threads:
            t.join(90)
    assert failed(outcomes) == [], failed(outcomes)[:5]
    for s in streams:
        assert s.get("status") == 200 and "error" not in s, s
        assert s["finish"] == "stop" and s["text"].endswith(" 599"), (s.get("finish"), s.get("text", "")[-40:])
        assert "@armitage" in s["text"]
    assert gw.master_pid == stack["proxy"].proc.pid and stack["proxy"].proc.poll() is None
    models = httpx.get(f"{api_base}/models", timeout=5).json()["data"]
    assert models[0]["root"] == "Qwen/Qwen2.5-14B-Instruct-AWQ"
    after = [o.seconds for o in outcomes if o.at >= began]
    print(
        f"drained redeploy: {len(outcomes)} requests, 0 failed; from the drain: p50 {pct(after, 50):.3f}s "
        f"p99 {pct(after, 99):.3f}s; drained (streams done) {drained - began:.1f}s after asking; "
        f"back in routing {back:.1f}s after the lease was given back; " + " | ".join(said)
    )
