"""The rendered motoko config, checked against the real LiteLLM proxy (slow: starts it).

Fake vLLM servers stand in for armitage, wintermute and the embeddings service; the config
is exactly what ``agent render`` writes for motoko, with the seed's per-host base-URL
overrides pointing at the fakes."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.adapters.secrets import EnvSecrets
from agent.cli.commands import main
from agent.core.stack import parse_env_file
from tests.proxykit import Proc, start_fake, start_proxy
from tests.test_validate import edit

pytestmark = pytest.mark.slow
TOKEN = "mkt-test-bearer-token-0123456789"


def start_stack(
    repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_port: int,
    openai: bool = False,
    budget: str = "0.000001",
    fake_env: dict[str, dict[str, str]] | None = None,
    gunicorn: bool = False,
) -> dict[str, Proc]:
    """The fakes and the proxy on the config ``agent render`` writes; ``fake_env``: extra
    environment per fake (e.g. ``FAKE_MODE_FILE``); ``budget``: the monthly OpenAI budget."""
    envs = fake_env or {}
    procs = {
        "armitage": start_fake(tmp_path, "armitage", "Qwen/Qwen2.5-7B-Instruct-AWQ", env=envs.get("armitage")),
        "wintermute": start_fake(
            tmp_path, "wintermute", "meta-llama/Meta-Llama-3.1-8B-Instruct-AWQ", env=envs.get("wintermute")
        ),
        "embed": start_fake(tmp_path, "embed", "BAAI/bge-base-en-v1.5"),
    }
    if openai:  # a stand-in for api.openai.com serving both paid models
        procs["openai"] = start_fake(tmp_path, "openai", "gpt-4.1-mini", extra=["gpt-4o-mini"])
        edit(
            repo / "fleet.yaml",
            "openai_budget_monthly_usd: 150",
            f"""openai_budget_monthly_usd: {budget}
openai_api_base: http://127.0.0.1:{procs["openai"].port}/v1""",
        )
    # The proxy runs here on the host network, not in its container: the fakes are on loopback.
    edit(repo / "fleet.yaml", "motoko: motoko", "motoko: motoko\nallow_loopback_backends: true")
    edit(
        repo / "hosts/motoko.yaml",
        "  embed_base_url: http://motoko:8200/v1",
        f"""  embed_base_url: http://127.0.0.1:{procs["embed"].port}/v1
  armitage_base_url: http://127.0.0.1:{procs["armitage"].port}/v1
  wintermute_base_url: http://127.0.0.1:{procs["wintermute"].port}/v1""",
    )
    monkeypatch.setenv(EnvSecrets.var("litellm_bearer_token"), TOKEN)
    monkeypatch.setenv(EnvSecrets.var("openai_api_key"), "sk-test-not-used")
    out = tmp_path / "rendered"
    assert main(["render", "--host", "motoko", "--repo", str(repo), "--out", str(out), "--reveal-secrets"]) == 0
    env = parse_env_file((out / "litellm.env").read_text())
    env.update(REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis_port))  # in the stack: the redis service
    try:
        procs["proxy"] = start_proxy(tmp_path, out / "config" / "config.yaml", env, gunicorn=gunicorn)
    except BaseException:
        for p in procs.values():
            p.stop()
        raise
    return procs


@pytest.fixture
def proxy(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_port: int) -> Iterator[dict[str, Proc]]:
    procs = start_stack(repo, tmp_path, monkeypatch, redis_port)
    yield procs
    for p in procs.values():
        p.stop()


def chat(port: int, model: str, text: str = "Hello!", token: str = TOKEN) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}"},
        json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16},
        timeout=60,
    )


def test_rendered_config_serves_the_five_aliases(proxy: dict[str, Proc]) -> None:
    port = proxy["proxy"].port
    r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert {m["id"] for m in r.json()["data"]} >= {
        "local/chat",
        "local/reasoner",
        "local/embed",
        "openai/strong",
        "openai/cheap",
    }
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
    wrong = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sk-wrong"}, timeout=10)
    assert wrong.status_code in (400, 401, 403), wrong.text

    r = chat(port, "local/chat")
    assert r.status_code == 200, r.text
    assert "armitage" in r.json()["choices"][0]["message"]["content"]
    assert r.headers["x-litellm-model-api-base"].startswith(f"http://127.0.0.1:{proxy['armitage'].port}")

    r = chat(port, "local/reasoner")
    assert r.status_code == 200 and "wintermute" in r.json()["choices"][0]["message"]["content"]

    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/embeddings",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"model": "local/embed", "input": ["hello"]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["embedding"]


def test_a_fresh_proxy_answers_at_once_without_fetching_a_tokenizer(proxy: dict[str, Proc]) -> None:
    """wintermute serves a "llama-3" model: without ``disable_hf_tokenizer_download`` LiteLLM
    fetches its tokenizer from the Hugging Face Hub at the first token count, synchronously;
    offline that blocked the worker 26 s per attempt (failures are not cached), its background
    health checks timed out and every deployment was cooled down: 429s for everything."""
    port = proxy["proxy"].port
    for model in ("local/reasoner", "local/chat", "local/reasoner"):
        began = time.monotonic()
        r = chat(port, model)
        assert r.status_code == 200, r.text
        assert time.monotonic() - began < 15, f"{model}: {time.monotonic() - began:.1f} s"
    log = proxy["proxy"].log.read_text(errors="replace")
    assert "Falling back to tiktoken" not in log and "huggingface.co" not in log


def test_fallback_chain_when_armitage_is_down(proxy: dict[str, Proc]) -> None:
    proxy["armitage"].stop()
    r = chat(proxy["proxy"].port, "local/chat")
    assert r.status_code == 200, r.text
    assert "wintermute" in r.json()["choices"][0]["message"]["content"]


def test_spent_budget_moves_openai_aliases_to_local_chat(
    repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_port: int,
) -> None:
    """Rule 5: past the monthly budget, openai/* is served by local/chat (here the budget is
    a millionth of a dollar, so the first paid answer spends it)."""
    subprocess.run(["redis-cli", "-p", str(redis_port), "flushall"], check=True, capture_output=True)
    procs = start_stack(repo, tmp_path, monkeypatch, redis_port, openai=True)
    try:
        port = procs["proxy"].port
        first = chat(port, "openai/strong")
        assert first.status_code == 200, first.text
        assert "openai" in first.json()["choices"][0]["message"]["content"]
        answered_by = ""
        for _ in range(20):  # the spend is booked asynchronously after the response
            r = chat(port, "openai/strong")
            assert r.status_code == 200, r.text
            answered_by = r.json()["choices"][0]["message"]["content"]
            if "armitage" in answered_by:
                break
            time.sleep(0.5)
        assert "armitage" in answered_by, answered_by
    finally:
        for p in procs.values():
            p.stop()
