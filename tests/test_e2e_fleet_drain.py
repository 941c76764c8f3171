"""End to end: deploys that drop no request (slow, docker, e2e), on the session's demo fleet
(``tests.e2ekit``: three agents as in production, the real LiteLLM proxy in its container,
fake vLLMs that take a while to "load their model" and expose vLLM's gauges).

- a model change pushed for armitage under 10 req/s with three 60-second streams in flight:
  no request fails, the streams complete, armitage is back once its new model answers;
- a push changing both GPU hosts: sampled every 100 ms, the proxy never serves ``local/chat``
  without both and the two vLLM containers are never down together; both converge;
- the motoko agent killed in the middle of a drain and started again: the lease is kept (one,
  never two), the rollout finishes;
- motoko unreachable during a node's deploy: the node goes on after ``drain.unreachable_s``
  and says so.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import docker
import httpx
import pytest

from tests.e2ekit import DEMO
from tests.gatewaykit import Load, failed, pct, stream_chat, wait_until
from tests.test_e2e_fleet import PROXY, Fleet

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.e2e]
GPU_HOSTS = ("armitage", "wintermute")


def demo_module(home: Path) -> ModuleType:
    """``scripts/demo`` as a module (its ``host_env`` and ``start_agents``), for this home."""
    os.environ["LLM_AGENT_DEMO"] = str(home)
    loader = importlib.machinery.SourceFileLoader("llm_agent_demo", str(DEMO))
    spec = importlib.util.spec_from_loader("llm_agent_demo", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class DrainFleet(Fleet):
    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.demo = demo_module(home)

    def edit(self, path: str, old: str, new: str) -> None:
        f = self.work / path
        text = f.read_text()
        assert old in text, f"{old!r} not in {path}"
        f.write_text(text.replace(old, new))

    def set_load(self, host: str, seconds: int) -> None:
        """The fake vLLM's model-load time on ``host`` (a changed environment: a new container)."""
        f = self.work / "hosts" / f"{host}.yaml"
        text, n = re.subn(r'FAKE_LOAD_S: "\d+"', f'FAKE_LOAD_S: "{seconds}"', f.read_text())
        assert n == 1, f"FAKE_LOAD_S not found once in {f}"
        f.write_text(text)

    def commit(self, message: str) -> str:
        git = ["git", "-C", str(self.work), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*git, "commit", "-qam", message], check=True)
        subprocess.run([*git, "push", "-q"], check=True, capture_output=True)
        return subprocess.run([*git, "rev-parse", "HEAD"], check=True, text=True, capture_output=True).stdout.strip()

    def applied_on(self, commit: str, hosts: tuple[str, ...]) -> bool:
        """Only those hosts' own status (not motoko's view: motoko may be frozen)."""
        return all((self.status(h).get("applied_commit") or "") == commit for h in hosts)

    def in_routing(self, *backends: str) -> bool:
        states = (self.status().get("routing_state") or {}).get("backends") or {}
        return all((states.get(b) or {}).get("in_routing") for b in backends)

    def settled(self, commit: str) -> bool:
        return self.applied(commit) and self.in_routing(*GPU_HOSTS) and not self.leases()

    def leases(self) -> list[dict[str, Any]]:
        """The drain leases in force (expired ones stay on file until given back or replaced)."""
        r = httpx.get(f"http://127.0.0.1:{self.demo.PORTS['fleet_api']}/v1/drains", timeout=5)
        held = r.json().get("leases") or [] if r.status_code == 200 else []
        return [lease for lease in held if lease.get("state") != "expired"]

    def agent_pid(self, host: str) -> int:
        return int((self.home / "hosts" / f"{host}.pid").read_text())

    def log(self, host: str) -> str:
        return (self.home / "logs" / f"{host}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def fleet(demo_home: Path) -> DrainFleet:
    """The session's demo fleet (tests/test_e2e_fleet.py ran on it first), with streams that
    last: the fake vLLMs take 0.1 s per token from now on. This first push is itself a drained
    deploy of both hosts."""
    f = DrainFleet(demo_home)
    for h in GPU_HOSTS:
        f.edit(f"hosts/{h}.yaml", 'FAKE_LOAD_S: "3"}', 'FAKE_LOAD_S: "3", FAKE_TOKEN_DELAY_S: "0.1"}')
    commit = f.commit("slow tokens")
    assert wait_until(lambda: f.settled(commit), 240, step=2), f.status()
    return f


def start_streams(token: str, n: int, max_tokens: int) -> tuple[list[threading.Thread], list[dict[str, Any]]]:
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    threads = [threading.Thread(target=stream_chat, args=(18000, token, max_tokens, results[i])) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_a_model_change_on_armitage_under_load_drops_nothing(fleet: DrainFleet) -> None:
    token = fleet.token()
    load = Load(18000, token).start()
    threads, streams = start_streams(token, 3, 600)  # 600 tokens at 0.1 s: a minute each
    try:
        time.sleep(3)
        fleet.edit("hosts/armitage.yaml", "Qwen/Qwen2.5-7B-Instruct-AWQ", "Qwen/Qwen2.5-14B-Instruct-AWQ")
        fleet.set_load("armitage", 10)
        pushed, commit = time.monotonic(), fleet.commit("armitage: a bigger model")

        def new_model_answers() -> bool:
            try:
                models = httpx.get("http://127.0.0.1:18001/v1/models", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            return any(m.get("root") == "Qwen/Qwen2.5-14B-Instruct-AWQ" for m in models.get("data", []))

        # Checked after the outcomes: what a missing drain costs the clients is the promise.
        asked = wait_until(lambda: bool(fleet.leases()), 30, step=0.5)
        assert wait_until(lambda: fleet.settled(commit), 240, step=1), fleet.status()
        assert new_model_answers()
        back = time.monotonic() - pushed
        for t in threads:
            t.join(120)
    finally:
        outcomes = load.stop()
    assert failed(outcomes) == [], failed(outcomes)[:5]
    for s in streams:
        assert s.get("status") == 200 and "error" not in s, s
        assert s["finish"] == "stop" and s["text"].endswith(" 599"), (s.get("finish"), s.get("text", "")[-40:])
        assert "@armitage" in s["text"], "the streams ran on armitage: the drain waited for them"
    assert asked, "armitage never asked for a drain"
    log = fleet.log("armitage")
    assert "drain lease granted" in log and "out of the gateway's routing" in log and "drained in" in log
    latencies = [o.seconds for o in outcomes]
    print(
        f"model change on armitage: {len(outcomes)} requests, 0 failed, p50 {pct(latencies, 50):.3f} s, "
        f"p99 {pct(latencies, 99):.3f} s; streams completed; armitage back {back:.1f} s after the push"
    )


class Sampler:
    """Every 100 ms: does the proxy serve local/chat with armitage or wintermute, and is at
    least one of the two vLLM containers running?"""

    def __init__(self, token: str) -> None:
        self.token = token
        self.samples: list[tuple[float, set[str], set[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        engine = docker.from_env()
        with httpx.Client(timeout=5, headers={"Authorization": f"Bearer {self.token}"}) as http:
            while not self._stop.wait(0.1):
                routed: set[str] = set()
                try:
                    for m in http.get(f"{PROXY}/v1/model/info").json().get("data", []):
                        if m.get("model_name") == "local/chat":
                            ident = str((m.get("model_info") or {}).get("id") or "")
                            routed |= {h for h in GPU_HOSTS if ident.endswith(f"@{h}")}
                except (httpx.HTTPError, ValueError):
                    continue  # the proxy did not answer this sample: no evidence either way
                running = set()
                for h in GPU_HOSTS:
                    try:
                        if engine.containers.get(f"demo-{h}-vllm-1").status == "running":
                            running.add(h)
                    except docker.errors.DockerException:
                        pass
                self.samples.append((time.monotonic(), routed, running))
        engine.close()


def test_a_push_changing_both_gpu_hosts_never_takes_both_out(fleet: DrainFleet) -> None:
    for h in GPU_HOSTS:
        fleet.set_load(h, 6)  # a new environment on both, and a model load of 6 s each
    with Sampler(fleet.token()) as sampler:
        commit = fleet.commit("both GPU hosts: a new environment")
        assert wait_until(lambda: fleet.settled(commit), 300, step=1), fleet.status()
        time.sleep(1)
    samples = sampler.samples
    assert len(samples) > 100, f"only {len(samples)} samples"
    both_out = [s for s in samples if not s[1]]
    both_down = [s for s in samples if not s[2]]
    assert both_out == [], f"{len(both_out)} samples with neither armitage nor wintermute routed"
    assert both_down == [], f"{len(both_down)} samples with neither vLLM running"
    one_out = [s for s in samples if len(s[1]) == 1]
    assert one_out, "no sample saw a backend drained: the deploys were not seen at all"
    print(f"both hosts: {len(samples)} samples, {len(one_out)} with one backend out, none with both out")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the restarted agent's Popen
def test_the_motoko_agent_killed_mid_drain_keeps_its_lease_and_the_rollout_finishes(fleet: DrainFleet) -> None:
    token = fleet.token()
    threads, streams = start_streams(token, 1, 200)  # 20 s: the drain waits for it
    time.sleep(2)
    fleet.set_load("armitage", 5)
    commit = fleet.commit("armitage: another environment")
    assert wait_until(lambda: bool(fleet.leases()), 60, step=0.5), "armitage never asked for a drain"
    os.kill(fleet.agent_pid("motoko"), signal.SIGKILL)
    time.sleep(3)
    db = fleet.home / "hosts" / "motoko" / "fleet.db"
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT host FROM leases").fetchall()
    assert rows == [("armitage",)], rows
    fleet.demo.start_agents()  # the pid is dead: motoko's agent starts again
    assert wait_until(lambda: fleet.settled(commit), 300, step=1), (fleet.status(), fleet.leases())
    for t in threads:
        t.join(60)
    assert streams[0].get("finish") == "stop", streams[0]


def test_motoko_unreachable_the_node_goes_on_after_its_deadline_and_says_so(fleet: DrainFleet) -> None:
    fleet.edit("fleet.yaml", "routing:", "drain:\n  unreachable_s: 8\nrouting:")
    settle = fleet.commit("drain: a short wait for an unreachable motoko")
    assert wait_until(lambda: fleet.settled(settle), 120, step=1), fleet.status()
    motoko = fleet.agent_pid("motoko")
    os.kill(motoko, signal.SIGSTOP)  # its API accepts connections and never answers
    try:
        fleet.set_load("armitage", 4)
        commit = fleet.commit("armitage: deployed while motoko is frozen")
        assert wait_until(lambda: fleet.applied_on(commit, ("armitage",)), 120, step=1), fleet.status("armitage")
    finally:
        os.kill(motoko, signal.SIGCONT)
    assert "going on WITHOUT a drain" in fleet.log("armitage")
    # The asks a frozen motoko queued are answered when it wakes: the lease they grant is given
    # back by the node at once (it retries its release), not held until it expires.
    assert wait_until(lambda: fleet.settled(commit), 60, step=1), (fleet.status(), fleet.leases())
