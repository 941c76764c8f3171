"""Helpers for tests against the real Docker engine: a throwaway fleet, cleanup by label,
an API-call recorder (a fake at our own seam: it wraps the engine's client, it calls through)."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.engine import DockerEngine
from agent.cli.commands import main
from agent.core import labels as L

ROOT = Path(__file__).resolve().parent.parent
FAKE_VLLM = "llm-agent-test/fake-vllm:1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker(*args: str, check: bool = True) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check).stdout.strip()


class Recorder:
    """Wraps ``docker.APIClient``; records the name of every API method called."""

    def __init__(self, api: Any) -> None:
        self._api = api
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._api, name)
        if callable(attr) and not name.startswith("_") and name not in ("create_host_config", "close"):

            def call(*a: Any, **k: Any) -> Any:
                self.calls.append(name)
                return attr(*a, **k)

            return call
        return attr


MUTATING = {
    "create_container",
    "start",
    "stop",
    "restart",
    "kill",
    "remove_container",
    "rename",
    "create_network",
    "connect_container_to_network",
    "pull",
    "create_volume",
    "remove_network",
}


@dataclass
class Fleet:
    repo: Path
    state: Path
    prefix: str
    ports: dict[str, int] = field(default_factory=dict)

    def set_host(self, host: str, text: str) -> None:
        (self.repo / "hosts" / f"{host}.yaml").write_text(text)

    def edit(self, rel: str, old: str, new: str) -> None:
        path = self.repo / rel
        text = path.read_text()
        assert old in text, (old, rel)
        path.write_text(text.replace(old, new, 1))

    def args(self, host: str) -> list[str]:
        return ["--host", host, "--repo", str(self.repo), "--prefix", self.prefix]

    def apply(self, host: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any]]:
        code = main(["apply", *self.args(host), "--state-dir", str(self.state), "--json", *extra])
        out = capsys.readouterr().out
        return code, json.loads(out)

    def plan(self, host: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
        # The stack files `apply` wrote are part of what is compared: the same state dir.
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AGENT_STATE_DIR", str(self.state))
            code = main(["plan", *self.args(host), "--json"])
        return code, json.loads(capsys.readouterr().out)

    def containers(self, host: str) -> list[dict[str, Any]]:
        """Our containers of one host's project: name, id, state, service."""
        out = docker("ps", "-a", "--filter", f"label={L.PROJECT}={self.prefix}{host}", "--format", "{{json .}}")
        rows = [json.loads(line) for line in out.splitlines() if line]
        return sorted(
            ({"name": r["Names"], "id": r["ID"], "state": r["State"], "status": r["Status"]} for r in rows),
            key=lambda r: r["name"],
        )


def gpu_host(port: int, image: str = FAKE_VLLM, extra: str = "") -> str:
    return f"""role: gpu_node
address: armitage  # never 127.0.0.1: in the proxy's container that is the container itself
vars:
  vllm_image: {image}
  model_hf_id: Qwen/Qwen2.5-7B-Instruct-AWQ
  serves: [local/chat]
  gpu_count: 0
  ulimits: {{}}
  health_probe: wget
  health_interval_s: 1
  health_start_period_s: 3
  vllm_published_port: {port}
  hf_cache_dir: /tmp/llm-agent-test-hf
{extra}"""


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    try:
        with DockerEngine() as engine:
            engine.api.ping()
    except Exception as exc:
        pytest.fail(f"Docker engine not reachable ({exc}); run scripts/setup")
    prefix = f"t{secrets.token_hex(3)}-"
    repo = tmp_path / "desired_state"
    shutil.copytree(ROOT / "desired_state", repo)
    f = Fleet(repo=repo, state=tmp_path / "state", prefix=prefix)
    f.ports = {"armitage": free_port(), "litellm": free_port()}
    f.set_host("armitage", gpu_host(f.ports["armitage"]))
    f.edit(
        "hosts/motoko.yaml",
        "litellm_port: 8000",
        f"""litellm_port: {f.ports["litellm"]}
  litellm_image: llm-agent-test/signal-recorder:1
  redis_image: llm-agent-test/busybox:1
  haproxy_image: llm-agent/haproxy:2.6
  health_interval_s: 1""",
    )
    try:
        yield f
    finally:
        cleanup(prefix)


def cleanup(prefix: str) -> None:
    """Remove every container, network and volume of the test projects, also after a failure."""
    ids = docker(
        "ps", "-a", "--filter", f"label={L.OWNER}={L.OWNER_VALUE}", "--format", '{{.ID}} {{.Label "' + L.PROJECT + '"}}'
    )
    mine = [
        line.split()[0] for line in ids.splitlines() if len(line.split()) > 1 and line.split()[1].startswith(prefix)
    ]
    if mine:
        docker("rm", "-f", *mine, check=False)
    for kind in ("network", "volume"):
        names = docker(kind, "ls", "--filter", f"label={L.OWNER}={L.OWNER_VALUE}", "--format", "{{.Name}}")
        doomed = [n for n in names.split() if n.startswith(prefix)]
        if doomed:
            docker(kind, "rm", *doomed, check=False)
