"""End to end: the whole fleet as ``scripts/demo`` runs it (slow, docker, e2e).

Three agents as they run in production (``agent run``, own state dir, project prefix
``demo-``), pulling from a bare git remote whose post-receive hook triggers them; LiteLLM
1.108.7 in its container with Redis; fake vLLMs for armitage and wintermute. The seed's
verification, a push converging every host, a backend killed under load, a bad push.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.adapters.secrets import SecretResolver
from tests.conftest import DEMO_IDENTITY
from tests.gatewaykit import Load, failed, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo"
PROXY = "http://127.0.0.1:18000"
ALIASES = {"local/chat", "local/reasoner", "local/embed", "openai/strong", "openai/cheap"}


class Fleet:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "LLM_AGENT_DEMO": str(home)}
        self.work = home / "desired"

    def cli(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **self.env,
            "PYTHONPATH": str(ROOT),
            "AGENT_CONFIG": str(self.home / "none.toml"),
            "AGENT_HOST": host,
            "AGENT_STATE_DIR": str(self.home / "hosts" / host),
        }
        cmd = ["python", "-m", "agent.cli", *args]
        return subprocess.run(cmd, env=env, text=True, capture_output=True, check=False)

    def status(self, host: str = "motoko") -> dict:  # type: ignore[type-arg]
        env = {
            **self.env,
            "PYTHONPATH": str(ROOT),
            "AGENT_CONFIG": str(self.home / "none.toml"),
            "AGENT_HOST": host,
            "AGENT_STATE_DIR": str(self.home / "hosts" / host),
        }
        out = subprocess.run(
            ["python", "-m", "agent.cli", "status", "--json"], env=env, text=True, capture_output=True, check=False
        )
        return dict(json.loads(out.stdout))

    def token(self) -> str:
        resolver = SecretResolver.for_repo(self.work, Path("/nonexistent"), DEMO_IDENTITY)
        return resolver.value("litellm_bearer_token")

    def push(self, path: str, old: str, new: str, message: str) -> str:
        f = self.work / path
        f.write_text(f.read_text().replace(old, new))
        git = ["git", "-C", str(self.work), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*git, "commit", "-qam", message], check=True)
        subprocess.run([*git, "push", "-q"], check=True, capture_output=True)
        return subprocess.run([*git, "rev-parse", "HEAD"], check=True, text=True, capture_output=True).stdout.strip()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("demo")
    f = Fleet(home)
    up = subprocess.run([str(DEMO)], env=f.env, text=True, capture_output=True, check=False, timeout=900)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield f
    finally:
        subprocess.run([str(DEMO), "down"], env=f.env, check=False, capture_output=True, timeout=300)


def chat(token: str, model: str = "local/chat") -> httpx.Response:
    return httpx.post(
        f"{PROXY}/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}"},
        json={"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8},
        timeout=60,
    )


def test_the_seeds_verification(fleet: Fleet) -> None:
    token = fleet.token()
    models = httpx.get(f"{PROXY}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert models.status_code == 200 and {m["id"] for m in models.json()["data"]} >= ALIASES
    assert httpx.get(f"{PROXY}/v1/models", timeout=30).status_code in (400, 401, 403)
    r = chat(token)
    assert r.status_code == 200 and "@armitage" in r.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{PROXY}/health/readiness", timeout=30).status_code == 200
    hosts = {h["host"]: h for h in fleet.status()["fleet"]}
    assert hosts["armitage"]["stage"] == "ready" and hosts["wintermute"]["stage"] == "ready"


def test_a_push_converges_every_host_and_motoko_shows_the_commit(fleet: Fleet) -> None:
    commit = fleet.push("fleet.yaml", "openai_budget_monthly_usd: 150", "openai_budget_monthly_usd: 140", "budget")
    began = time.monotonic()

    def everywhere() -> bool:
        if any((fleet.status(h).get("applied_commit") or "") != commit for h in ("motoko", "armitage", "wintermute")):
            return False
        view = {h["host"]: h.get("commit") for h in fleet.status()["fleet"]}
        return view.get("armitage") == commit and view.get("wintermute") == commit

    assert wait_until(everywhere, 60, step=1), fleet.status()
    print(f"push converged on every host and shown by motoko in {time.monotonic() - began:.1f} s")


def test_armitage_killed_under_load_costs_no_request_and_comes_back(fleet: Fleet) -> None:
    token = fleet.token()
    load = Load(18000, token).start()
    try:
        time.sleep(2)
        # Paused, armitage's agent does not start its backend again at once (it would, within
        # a second: drift), so the gateway sees a dead backend, as when a host goes down.
        assert fleet.cli("armitage", "pause", "--reason", "e2e: backend killed").returncode == 0
        subprocess.run(["docker", "kill", "demo-armitage-vllm-1"], check=True, capture_output=True)
        killed = time.time()

        def out() -> bool:
            events = fleet.status().get("routing_state", {}).get("events", [])
            return any(e["backend"] == "armitage" and e["change"] == "out" and e["at"] >= killed for e in events)

        def back() -> bool:
            events = fleet.status().get("routing_state", {}).get("events", [])
            return any(e["backend"] == "armitage" and e["change"] == "in" and e["at"] >= killed for e in events)

        assert wait_until(out, 30, step=0.5), fleet.status().get("routing_state")
        print(f"armitage out of routing {time.time() - killed:.1f} s after the kill (status polled)")
        assert fleet.cli("armitage", "resume").returncode == 0
        # The armitage agent starts its container again (drift), and motoko puts it back.
        assert wait_until(back, 90, step=1), fleet.status().get("routing_state")
        time.sleep(2)
    finally:
        outcomes = load.stop()
    assert failed(outcomes) == [], failed(outcomes)[:5]


def container_id(name: str) -> str:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.Id}} {{.State.Status}}", name], text=True, capture_output=True, check=True
    )
    return out.stdout.strip()


def test_a_bad_push_takes_nothing_down_and_is_reported(fleet: Fleet) -> None:
    before = fleet.status("armitage")["applied_commit"]
    running = {n: container_id(n) for n in ("demo-armitage-vllm-1", "demo-litellm")}
    assert all(v.endswith(" running") for v in running.values()), running
    bad = fleet.push("hosts/armitage.yaml", "serves: [local/chat]", "serves: [local/chat", "broken yaml")

    def refused() -> bool:
        last = fleet.status("armitage").get("last_run") or {}
        return last.get("commit") == bad and last.get("failure") == "desired-state"

    assert wait_until(refused, 60, step=1), fleet.status("armitage").get("last_run")
    error = fleet.status("armitage")["last_run"]["error"]
    assert "hosts/armitage.yaml:" in error, error
    assert fleet.status("armitage")["applied_commit"] == before
    motoko = fleet.status("motoko")
    assert (motoko.get("last_run") or {}).get("failure") == "desired-state", "motoko reads every host file too"
    assert {n: container_id(n) for n in running} == running, "same containers, still running"
    token = fleet.token()
    assert chat(token).status_code == 200
    # armitage keeps serving local/chat (LiteLLM may still hold it in a cooldown from the test
    # before for up to cooldown_s, 30 s).
    assert wait_until(lambda: "@armitage" in chat(token).text, 60, step=2)
    fleet.push("hosts/armitage.yaml", "serves: [local/chat\n", "serves: [local/chat]\n", "fix")
