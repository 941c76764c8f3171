"""Benchmark: the seed's LiteLLM config against this project's, while a backend fails.

Same fake vLLM backends (armitage serves ``local/chat``, wintermute ``local/reasoner``, an
embeddings fake, and a fake standing in for api.openai.com), same real LiteLLM proxy
(1.108.7 from the cached venv, ``--run_gunicorn``, one worker), same load: 10 requests/s to
``local/chat`` (``tests.gatewaykit.Load``), client timeout 60 s (the bound of every run; a
request still unanswered then counts as failed, at 60 s).

- ``seed``: the config the old Ansible role rendered (``SEED_CONFIG`` below, read from
  ``../shared/seed/000_*.txt``): one deployment per alias, ``router_settings.fallbacks``
  local/chat -> local/reasoner -> openai/strong, nothing else. The seed sets no timeout and
  no ``num_retries``, so LiteLLM's defaults hold (``request_timeout`` 6000 s, 2 retries).
  No routing loop: the old setup rerouted by hand.
- ``ours``: the config ``agent render --host motoko`` writes from the shipped
  ``desired_state/`` (backends pointed at the fakes, as ``tests.test_litellm_proxy.start_stack``
  does), with Redis, plus the motoko agent's routing loop (``tests.gatewaykit.ProcessGateway``:
  the real ``RoutingLoop``, probes every 2 s, reload worker by worker).

Scenarios, each on a fresh proxy (Redis flushed between runs): ``kill`` (armitage's fake
stopped, then started again on its port), ``hang`` (accepts, never answers; plain
requests), ``stall`` (200 and headers, then nothing; streamed requests), ``deploy`` (a planned
redeploy of armitage: its new version takes ``DEPLOY_LOAD_S`` to load its model; armitage takes
50 ms per token, so requests are in flight when it stops; streamed requests. ``seed``: the
Ansible way, restart in place; ``ours``: the agent's drain (lease from the drain desk, out of
routing, wait until idle, replace, canary, lease back), the fault phase lasting as long as the
drain and replacement do). Phases: 5 s
healthy, the fault for 30 s (``--quick``: 15 s), 10 s of recovery. Per phase (by the time a
request was sent): requests, failed (not a 200 answered by a backend), p50/p99 latency over
all of them (a failed one with the time it took), who answered (a backend, or the client's
error), what the routing loop did in that phase (ours: each reload, from the fault's start,
and when the proxy served it), the 1-minute load average at the phase's end. A request whose
pooled connection was closed before any answer (a retired worker's) is sent once more, as
the OpenAI SDK does (``Load``), and counted once. Prints one markdown table on stdout;
progress (and with ``--timeline`` each run 2.5 s at a time) goes to stderr.

Run: ``python bench/failover.py [--scenarios kill,hang,stall] [--configs seed,ours] [--quick]``
(needs ``scripts/litellm-venv`` and redis-server, as the slow proxy tests do).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import DEMO_IDENTITY  # noqa: E402
from tests.dockerkit import free_port  # noqa: E402
from tests.gatewaykit import Load, Outcome, ProcessGateway, Reload, failed, pct, window  # noqa: E402
from tests.proxykit import Proc, start_fake, start_proxy  # noqa: E402
from tests.test_litellm_proxy import TOKEN, start_stack  # noqa: E402

HEALTHY_S, FAULT_S, QUICK_FAULT_S, RECOVERY_S = 5.0, 30.0, 15.0, 10.0
RATE = 10.0
CLIENT_TIMEOUT_S = 60.0
#: requests in flight at most: a wedged proxy holds every request for the client timeout
MAX_IN_FLIGHT = int(RATE * CLIENT_TIMEOUT_S * 1.5)
SCENARIOS = ("kill", "hang", "stall", "deploy")
#: ``deploy``: armitage's new version "loads its model" this long (its port closed meanwhile)
DEPLOY_LOAD_S = 10.0
#: ``deploy``: armitage takes this long per token (requests are in flight when it stops)
DEPLOY_TOKEN_DELAY_S = "0.05"
CONFIGS = ("seed", "ours")
SERVED = {
    "armitage": "Qwen/Qwen2.5-7B-Instruct-AWQ",
    "wintermute": "meta-llama/Meta-Llama-3.1-8B-Instruct-AWQ",
    "embed": "BAAI/bge-base-en-v1.5",
}

#: The seed's ``litellm.config.yaml.j2`` as the old Ansible role rendered it: the five aliases,
#: one deployment each (local models as ``openai/<served name>`` + ``api_base``, the seed's
#: ``*_model_display`` convention), the fallback chain of its "Routing Policy", the bearer
#: token as master key. The seed gives no timeout, retries, cooldown or health checks.
SEED_CONFIG = """\
model_list:
  - model_name: local/chat
    litellm_params:
      model: openai/Qwen/Qwen2.5-7B-Instruct-AWQ
      api_base: http://127.0.0.1:{armitage}/v1
      api_key: none
  - model_name: local/reasoner
    litellm_params:
      model: openai/meta-llama/Meta-Llama-3.1-8B-Instruct-AWQ
      api_base: http://127.0.0.1:{wintermute}/v1
      api_key: none
  - model_name: local/embed
    litellm_params:
      model: openai/BAAI/bge-base-en-v1.5
      api_base: http://127.0.0.1:{embed}/v1
      api_key: none
  - model_name: openai/strong
    litellm_params:
      model: openai/gpt-4.1-mini
      api_base: http://127.0.0.1:{openai}/v1
      api_key: os.environ/OPENAI_API_KEY
  - model_name: openai/cheap
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:{openai}/v1
      api_key: os.environ/OPENAI_API_KEY
router_settings:
  fallbacks:
    - local/chat: [local/reasoner, openai/strong]
    - local/reasoner: [openai/strong]
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- processes


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[int]:
    """A throwaway redis-server on loopback (as ``tests.proxykit.redis_port`` starts it)."""
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server not installed; run scripts/setup")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end and redis_cli(port, "ping") != "PONG":
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def redis_cli(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def armitage_env(mode_file: Path, scenario: str) -> dict[str, str]:
    env = {"FAKE_MODE_FILE": str(mode_file)}
    if scenario == "deploy":
        env["FAKE_TOKEN_DELAY_S"] = DEPLOY_TOKEN_DELAY_S
    return env


def start_seed(tmp: Path, mode_file: Path, scenario: str) -> dict[str, Proc]:
    procs: dict[str, Proc] = {}
    try:
        for name, served in SERVED.items():
            env = armitage_env(mode_file, scenario) if name == "armitage" else None
            procs[name] = start_fake(tmp, name, served, env=env)
        procs["openai"] = start_fake(tmp, "openai", "gpt-4.1-mini", extra=["gpt-4o-mini"])
        config = tmp / "seed-config.yaml"
        config.write_text(SEED_CONFIG.format(**{n: p.port for n, p in procs.items()}))
        env = {"LITELLM_MASTER_KEY": TOKEN, "OPENAI_API_KEY": "sk-test-not-used"}
        procs["proxy"] = start_proxy(tmp, config, env, gunicorn=True)
    except BaseException:
        stop_all(procs)
        raise
    return procs


def start_ours(tmp: Path, mode_file: Path, redis_port: int, scenario: str) -> tuple[dict[str, Proc], ProcessGateway]:
    repo = tmp / "desired_state"
    shutil.copytree(ROOT / "desired_state", repo)
    # Never undone: the routing loop resolves the same secrets (env AGENT_SECRET_*) while it runs.
    mp = pytest.MonkeyPatch()
    with contextlib.redirect_stdout(sys.stderr):  # `agent render` says what it wrote
        procs = start_stack(
            repo,
            tmp,
            mp,
            redis_port,
            openai=True,
            budget="150",
            fake_env={"armitage": armitage_env(mode_file, scenario)},
            gunicorn=True,
        )
    gw = ProcessGateway(repo, tmp / "rendered" / "config" / "config.yaml", procs["proxy"], TOKEN, drains=True)
    return procs, gw.start()


def stop_all(procs: dict[str, Proc]) -> None:
    for name, p in procs.items():
        p.stop()
        if name == "proxy":
            # ``Proc.stop`` waits 10 s for the gunicorn master, then kills it alone: a worker
            # wedged on a stalled stream outlives it (an orphan that keeps its CPU and its
            # connections, and slowed every later run). The proxy is its own session
            # (``start_proxy``): end the whole group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------- load


@dataclass
class BenchLoad(Load):
    """``Load`` with room for every request a wedged proxy holds until the client timeout
    (``Load``'s 256 threads would delay sending, and so the rate, once 256 hang)."""

    timeout_s: float = CLIENT_TIMEOUT_S
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT)
        self._client = httpx.Client(
            timeout=self.timeout_s,
            limits=httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=64),
        )
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def close(self) -> None:
        """For a load never started (``stop`` joins the sending thread)."""
        self._pool.shutdown(wait=True)
        self._client.close()


def warm_up(port: int, stream: bool) -> None:
    """A few requests before the clock starts (a new worker's first answers are slow)."""
    load = BenchLoad(port, TOKEN, stream=stream)
    for _ in range(3):
        load.one()
    load.close()


# ---------------------------------------------------------------------------- one run


@dataclass
class Run:
    config: str
    scenario: str
    outcomes: list[Outcome]
    phases: list[tuple[str, float, float]]  # name, start, end (monotonic)
    loads: list[float]  # the 1-minute load average at the end of each phase
    reloads: list[Reload]  # ours: what the routing loop did
    seconds: float


def run_one(config: str, scenario: str, fault_s: float, redis_port: int) -> Run:
    began = time.monotonic()
    redis_cli(redis_port, "flushall")
    with tempfile.TemporaryDirectory(prefix=f"bench-failover-{config}-{scenario}-") as d:
        tmp = Path(d)
        mode_file = tmp / "armitage.mode"
        mode_file.write_text("ok")
        gw: ProcessGateway | None = None
        if config == "seed":
            procs = start_seed(tmp, mode_file, scenario)
        else:
            procs, gw = start_ours(tmp, mode_file, redis_port, scenario)
        try:
            return _drive(config, scenario, fault_s, Stack(procs, gw, mode_file, tmp), began)
        finally:
            mode_file.write_text("ok")
            if gw is not None:
                gw.stop()
            stop_all(procs)


@dataclass
class Stack:
    procs: dict[str, Proc]
    gw: ProcessGateway | None
    mode_file: Path
    tmp: Path


def _drive(config: str, scenario: str, fault_s: float, stack: Stack, began: float) -> Run:
    procs, mode_file, tmp = stack.procs, stack.mode_file, stack.tmp
    stream = scenario in ("stall", "deploy")
    warm_up(procs["proxy"].port, stream)
    log(f"{config}/{scenario}: proxy up after {time.monotonic() - began:.1f}s; load starts")
    load = BenchLoad(procs["proxy"].port, TOKEN, stream=stream).start()
    t0 = time.monotonic()
    time.sleep(HEALTHY_S)
    loads = [os.getloadavg()[0]]
    t_fault = time.monotonic()
    armitage_port = procs["armitage"].port
    if scenario == "deploy":
        redeploy(config, stack)
    elif scenario == "kill":
        procs["armitage"].stop()
    else:
        mode_file.write_text(scenario)
    time.sleep(max(0.0, t_fault + fault_s - time.monotonic()) if scenario != "deploy" else 0.0)
    loads.append(os.getloadavg()[0])
    t_rec = time.monotonic()
    if scenario == "kill":
        env = {"FAKE_MODE_FILE": str(mode_file)}
        procs["armitage"] = start_fake(tmp, "armitage", SERVED["armitage"], env=env, port=armitage_port)
    elif scenario == "deploy":
        pass  # armitage is back already
    else:
        mode_file.write_text("ok")
    time.sleep(max(0.0, t_rec + RECOVERY_S - time.monotonic()))
    loads.append(os.getloadavg()[0])
    t_end = time.monotonic()
    log(f"{config}/{scenario}: load stops; draining what is in flight (at most {CLIENT_TIMEOUT_S:.0f}s)")
    outcomes = load.stop()
    phases = [("healthy", t0, t_fault), (scenario, t_fault, t_rec), ("recovery", t_rec, t_end)]
    reloads = list(stack.gw.reloads) if stack.gw is not None else []
    seconds = time.monotonic() - began
    log(f"{config}/{scenario}: done in {seconds:.0f}s, {len(failed(outcomes))} of {len(outcomes)} failed")
    return Run(config, scenario, outcomes, phases, loads, reloads, seconds)


def redeploy(config: str, stack: Stack) -> None:
    """armitage's planned redeploy: stop, load the new model, start; ``ours`` inside a drain."""
    procs = stack.procs
    port = procs["armitage"].port

    def replace() -> None:
        procs["armitage"].stop()
        time.sleep(DEPLOY_LOAD_S)
        env = armitage_env(stack.mode_file, "deploy")
        procs["armitage"] = start_fake(stack.tmp, "armitage", SERVED["armitage"], env=env, port=port)

    if stack.gw is None:
        replace()
        return
    gate = stack.gw.drain_gate("armitage", f"http://127.0.0.1:{port}/v1", SERVED["armitage"], say=log)
    with gate("vllm", "bench: planned redeploy"):
        replace()


# ---------------------------------------------------------------------------- report


def label(o: Outcome) -> str:
    if o.status == 200 and ":" not in o.by:
        return o.by
    if o.status is None:  # the client's error: its exception's name
        return o.by.split(":", 1)[0]
    return f"HTTP {o.status}"


def answered_by(outcomes: list[Outcome]) -> str:
    counts = Counter(label(o) for o in outcomes)
    return ", ".join(f"{k} {v}" for k, v in counts.most_common())


def secs(value: float) -> str:
    if math.isnan(value):  # no requests
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def reload_note(r: Reload, t_fault: float) -> str:
    """One reload, its times from the fault's start: decided, and served (or why not)."""
    what = f"out: {', '.join(r.out)}" if r.out else "all in"
    done = f"served +{r.at - t_fault + r.served_after_s:.1f} s" if r.ok else f"NOT served ({r.detail})"
    return f"reload at +{r.at - t_fault:.1f} s ({what}), {done}"


def rows(run: Run) -> list[str]:
    out = []
    t_fault = run.phases[1][1]
    for (phase, start, end), load in zip(run.phases, run.loads, strict=True):
        got = window(run.outcomes, start, end)
        lat = [o.seconds for o in got]
        notes = [reload_note(r, t_fault) for r in run.reloads if start <= r.at < end]
        if resent := sum(o.resent for o in got):
            notes.append(f"{resent} resent")
        out.append(
            f"| {run.config} | {run.scenario} | {phase} ({end - start:.0f} s) | {len(got)} | {len(failed(got))} "
            f"| {secs(pct(lat, 50))} | {secs(pct(lat, 99))} | {answered_by(got)} | {'; '.join(notes)} | {load:.1f} |"
        )
    return out


def table(runs: list[Run]) -> str:
    head = [
        "| config | scenario | phase | requests | failed | p50 | p99 | answered by | routing loop | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [r for run in runs for r in rows(run)])


def timeline(run: Run, step: float = 2.5) -> None:
    """On stderr: each ``step`` seconds of sending, from the fault's start."""
    t_fault, t_end = run.phases[1][1], run.phases[2][2]
    at = run.phases[0][1]
    while at < t_end:
        got = window(run.outcomes, at, at + step)
        lat = [o.seconds for o in got]
        log(
            f"  {run.config}/{run.scenario} {at - t_fault:+6.1f}s: {len(got)} sent, {len(failed(got))} failed, "
            f"p50 {secs(pct(lat, 50))}, max {secs(max(lat, default=math.nan))}; {answered_by(got)}"
        )
        at += step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--quick", action="store_true", help=f"fault for {QUICK_FAULT_S:.0f} s, not {FAULT_S:.0f} s")
    ap.add_argument("--timeline", action="store_true", help="also each run, 2.5 s at a time, on stderr")
    args = ap.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    configs = [c for c in args.configs.split(",") if c]
    for value, allowed in ((scenarios, SCENARIOS), (configs, CONFIGS)):
        if bad := [v for v in value if v not in allowed]:
            ap.error(f"unknown {bad}; choose from {', '.join(allowed)}")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    fault_s = QUICK_FAULT_S if args.quick else FAULT_S
    began, load_before = time.monotonic(), os.getloadavg()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as d:
        os.environ.update(
            AGENT_SECRETS_FILE=str(Path(d) / "no-secrets.yaml"),
            AGENT_IDENTITY_FILE=str(DEMO_IDENTITY),
            AGENT_LOCK_DIR=d,
        )
        with redis_server(Path(d)) as redis_port:
            for scenario in scenarios:
                for config in configs:
                    runs.append(run_one(config, scenario, fault_s, redis_port))
                    if args.timeline:
                        timeline(runs[-1])
    print(table(runs))
    load_after = os.getloadavg()
    log(
        f"{time.monotonic() - began:.0f}s in all; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
