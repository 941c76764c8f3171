"""The local images (``scripts/images``) stand in for the fleet's real ones under the production
templates unchanged but for the image reference: each starts with the command and passes the
healthcheck its role's template renders; LiteLLM serves a chat through the fake vLLM and
reloads a renamed-in config on SIGHUP without a restart."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.cli.commands import main
from tests.dockerkit import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LITELLM, REDIS, FAKE_VLLM = "llm-agent/litellm:1.108.7", "llm-agent/redis:7", "llm-agent/fake-vllm:1"
LABEL = "llm-agent-test.local-images"
SERVED = "Qwen/Qwen2.5-7B-Instruct-AWQ"  # what armitage serves in desired_state/
KEY = "sk-local-images"


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["docker", *args], check=False, capture_output=True, text=True, timeout=timeout)
    assert not check or out.returncode == 0, f"docker {' '.join(args)}: {out.stderr.strip()}"
    return out


def inspect(name: str, fmt: str) -> str:
    return docker("inspect", "-f", fmt, name).stdout.strip()


class Env:
    """Names for one module run: everything carries LABEL=<prefix> and is removed at the end."""

    def __init__(self, prefix: str, net: str) -> None:
        self.prefix, self.net = prefix, net

    def run(self, name: str, image: str, *args: str, opts: tuple[str, ...] = ()) -> str:
        full = f"{self.prefix}{name}"
        docker(
            "run", "-d", "--name", full, "--label", f"{LABEL}={self.prefix}", "--network", self.net, *opts, image, *args
        )
        return full


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    built = subprocess.run(
        [str(ROOT / "scripts" / "images")], check=False, capture_output=True, text=True, timeout=1200
    )
    assert built.returncode == 0, built.stderr
    prefix = f"tli{secrets.token_hex(3)}-"
    net = f"{prefix}net"
    docker("network", "create", "--label", f"{LABEL}={prefix}", net)
    try:
        yield Env(prefix, net)
    finally:
        ids = docker("ps", "-aq", "--filter", f"label={LABEL}={prefix}", check=False).stdout.split()
        if ids:
            docker("rm", "-f", "-v", *ids, check=False)
        docker("network", "rm", net, check=False)


def rendered(tmp_path: Path, host: str, extra_vars: str = "") -> dict[str, Any]:
    """The services of ``host``'s compose.yaml, rendered from the shipped desired state."""
    repo = tmp_path / f"ds-{host}"
    shutil.copytree(ROOT / "desired_state", repo)
    if extra_vars:
        path = repo / "hosts" / f"{host}.yaml"
        path.write_text(path.read_text().rstrip("\n") + "\n" + extra_vars)
    out = tmp_path / f"out-{host}"
    assert main(["render", "--host", host, "--repo", str(repo), "--out", str(out)]) == 0
    services: dict[str, Any] = yaml.safe_load((out / "compose.yaml").read_text())["services"]
    return services


def wait_for(url: str, deadline_s: float, headers: dict[str, str] | None = None) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def healthcheck(container: str, test: list[str]) -> int:
    """Run a compose healthcheck ``["CMD", ...]`` in the container; its exit status."""
    assert test[0] == "CMD", test
    return docker("exec", container, *test[1:], check=False, timeout=30).returncode


# --- Redis ------------------------------------------------------------------------------


def test_redis_runs_the_motoko_command_and_answers_other_containers(env: Env, tmp_path: Path) -> None:
    redis = rendered(tmp_path, "motoko")["redis"]
    name = env.run("redis", REDIS, *redis["command"])  # redis-server --appendonly yes
    end = time.monotonic() + 20
    while healthcheck(name, redis["healthcheck"]["test"]) != 0:
        assert time.monotonic() < end, docker("logs", name).stderr
        time.sleep(0.2)
    # Another container on the network gets PONG, not "DENIED ... protected mode".
    other = docker("run", "--rm", "--network", env.net, "--label", f"{LABEL}={env.prefix}", REDIS,
                   "redis-cli", "-h", name, "ping")  # fmt: skip
    assert other.stdout.strip() == "PONG", other.stdout + other.stderr
    assert docker("exec", name, "redis-cli", "config", "get", "appendonly").stdout.split() == ["appendonly", "yes"]


# --- fake vLLM --------------------------------------------------------------------------


def start_fake(env: Env, name: str, command: list[str], *opts: str) -> tuple[str, int]:
    port = free_port()
    container = env.run(name, FAKE_VLLM, *command, opts=("-p", f"127.0.0.1:{port}:8000", *opts))
    return container, port


def test_fake_vllm_loads_then_serves_under_the_gpu_node_template(env: Env, tmp_path: Path) -> None:
    vllm = rendered(tmp_path, "armitage")["vllm"]
    command = [*vllm["command"], "--enable-prefix-caching", "--some-future-flag=1"]
    name, port = start_fake(env, "vllm", command, "-e", "FAKE_LOAD_S=3", "-e", "FAKE_NAME=armitage")
    base = f"http://127.0.0.1:{port}"
    time.sleep(1)
    assert not wait_for(f"{base}/health", 0.5), "the port answers while the model loads"
    assert healthcheck(name, vllm["healthcheck"]["test"]) != 0
    assert wait_for(f"{base}/health", 20), docker("logs", name).stderr
    assert "Loading model weights took" in docker("logs", name).stderr
    assert healthcheck(name, vllm["healthcheck"]["test"]) == 0  # python3 -c urllib...
    for probe in ("wget", "curl"):
        test = rendered(tmp_path / probe, "armitage", f"  health_probe: {probe}\n")["vllm"]["healthcheck"]["test"]
        assert test[1] == probe and healthcheck(name, test) == 0, test

    models = httpx.get(f"{base}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [SERVED]
    chat = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    r = httpx.post(f"{base}/v1/chat/completions", json=chat)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith(f"fake:{SERVED}@armitage")
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**chat, "stream": True}) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3

    # Modes switch at runtime through the mode file (or POST /fake/mode).
    docker("exec", name, "sh", "-c", "echo error > /tmp/fake-mode")
    assert httpx.get(f"{base}/health").status_code == 500
    assert healthcheck(name, vllm["healthcheck"]["test"]) != 0
    assert httpx.post(f"{base}/fake/mode", json={"mode": "ok"}).json() == {"mode": "ok"}
    assert httpx.get(f"{base}/health").status_code == 200

    started = time.monotonic()
    docker("stop", "-t", "10", name)
    assert time.monotonic() - started < 5, "SIGTERM as PID 1 must stop it at once"


def gauges(base: str) -> dict[str, float]:
    lines = httpx.get(f"{base}/metrics").text.splitlines()
    return {ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("vllm:")}


def test_fake_vllm_generates_slowly_and_counts_requests_in_its_gauges(env: Env) -> None:
    args = ["--model", "m", "--served-model-name", "m", "--port", "8000", "--max-num-seqs", "1"]
    name, port = start_fake(env, "slow", args, "-e", "FAKE_TOKEN_DELAY_S=0.2")
    base = f"http://127.0.0.1:{port}"
    assert wait_for(f"{base}/health", 20), docker("logs", name).stderr
    assert gauges(base) == {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    results: list[httpx.Response] = []

    def ask() -> None:
        results.append(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.8)
    assert gauges(base) == {"vllm:num_requests_running": 1.0, "vllm:num_requests_waiting": 1.0}
    for t in threads:
        t.join()
    took = time.monotonic() - started
    assert 3.8 < took < 8, f"two requests of 10 tokens at 0.2 s, one slot: {took:.1f}s"
    assert [r.json()["usage"]["completion_tokens"] for r in results] == [10, 10]
    assert gauges(base)["vllm:num_requests_running"] == 0.0


# --- LiteLLM ----------------------------------------------------------------------------


def litellm_config(backend: str, aliases: list[str]) -> str:
    models = [
        {"model_name": a, "litellm_params": {"model": f"hosted_vllm/{SERVED}", "api_base": f"http://{backend}:8000/v1",
                                            "timeout": 10}}
        for a in aliases
    ]  # fmt: skip
    cfg = {"model_list": models, "litellm_settings": {"num_retries": 0},
           "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"}}  # fmt: skip
    return json.dumps(cfg)  # JSON is YAML


def replace_by_rename(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.replace(path)


def start_litellm(env: Env, litellm: dict[str, Any], config_dir: Path) -> tuple[str, int]:
    """The rendered command, with the role's config/sitecustomize.py (gunicorn's first start
    froze on an import lock without it: see the file), one readiness deadline, one restart."""
    shutil.copy(ROOT / "roles" / "motoko" / "templates" / "sitecustomize.py", config_dir / "sitecustomize.py")
    port = free_port()
    command = list(litellm["command"])
    command[command.index("--num_workers") + 1] = "1"
    name = env.run("litellm", LITELLM, *command, opts=(
        "-p", f"127.0.0.1:{port}:4000", "-v", f"{config_dir}:/app/config:ro",
        "-e", f"LITELLM_MASTER_KEY={KEY}", "-e", "GRACEFUL_SHUTDOWN_TIMEOUT=5", "-e", "PYTHONPATH=/app/config",
    ))  # fmt: skip
    ready = f"http://127.0.0.1:{port}/health/readiness"
    if not wait_for(ready, 60):
        docker("restart", "-t", "5", name)
        assert wait_for(ready, 60), docker("logs", "--tail", "40", name).stderr
    return name, port


def chat(port: int, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip


def served_aliases(port: int) -> set[str]:
    r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    return {m["id"] for m in r.json()["data"]} if r.status_code == 200 else set()


def test_litellm_serves_the_fake_and_reloads_a_renamed_config_on_sighup(env: Env, tmp_path: Path) -> None:
    services = rendered(tmp_path, "motoko")
    vllm = rendered(tmp_path, "armitage")["vllm"]
    backend = env.run("armitage", FAKE_VLLM, *vllm["command"], opts=("-e", "FAKE_NAME=armitage"))
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.yaml").write_text(litellm_config(backend, ["local/chat"]))
    name, port = start_litellm(env, services["litellm"], config_dir)
    assert healthcheck(name, services["litellm"]["healthcheck"]["test"]) == 0  # python3 urllib

    r = chat(port, "local/chat")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith(f"fake:{SERVED}@armitage")
    assert served_aliases(port) == {"local/chat"}

    before = (inspect(name, "{{.Id}}"), inspect(name, "{{.State.StartedAt}}"))
    replace_by_rename(config_dir / "config.yaml", litellm_config(backend, ["local/chat", "local/reloaded"]))
    docker("kill", "--signal", "HUP", name)
    end = time.monotonic() + 30
    while served_aliases(port) != {"local/chat", "local/reloaded"}:
        assert time.monotonic() < end, docker("logs", "--tail", "40", name).stderr
        time.sleep(0.25)
    assert chat(port, "local/reloaded").status_code == 200
    assert (inspect(name, "{{.Id}}"), inspect(name, "{{.State.StartedAt}}")) == before
    assert inspect(name, "{{.RestartCount}}") == "0" and inspect(name, "{{.State.Running}}") == "true"


def test_litellm_imports_the_ascii_codec_before_any_thread_through_the_rendered_sitecustomize(
    env: Env, tmp_path: Path
) -> None:
    """The first-start freeze (a worker forked while the arbiter's reaper thread imported
    ``encodings.ascii`` inherits that import's lock, and deadlocks in its startup): the motoko
    stack's ``config/sitecustomize.py``, found through ``PYTHONPATH=/app/config``, imports the
    codec when Python starts, in the image's own interpreter, so no thread is left to import it."""
    repo = tmp_path / "ds"
    shutil.copytree(ROOT / "desired_state", repo)
    out = tmp_path / "out"
    assert main(["render", "--host", "motoko", "--repo", str(repo), "--out", str(out)]) == 0
    envfile = dict(
        line.split("=", 1) for line in (out / "litellm.env").read_text().splitlines() if line and line[0] != "#"
    )
    assert envfile["PYTHONPATH"] == "/app/config"
    mount = out / "config"
    assert (mount / "sitecustomize.py").is_file()
    probe = "import sys; print('encodings.ascii' in sys.modules)"
    python = ("--entrypoint", "/opt/litellm/bin/python3", "-v", f"{mount}:/app/config:ro")
    fixed = docker("run", "--rm", "-e", "PYTHONPATH=/app/config", *python, LITELLM, "-c", probe)
    bare = docker("run", "--rm", *python, LITELLM, "-c", probe)
    assert (fixed.stdout.strip(), bare.stdout.strip()) == ("True", "False"), (fixed.stderr, bare.stderr)
