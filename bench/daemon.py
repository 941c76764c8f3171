"""Benchmark: the idle daemon's footprint and the cost of a no-change poll.

Side by side in one run:
- ``agent run`` watching a bare git repo (interval 30 s, the default) for ``--seconds``
  after its first pass: RSS (VmRSS) and CPU time used, from /proc;
- the peer: a bare Python process importing the same libraries (docker, httpx, jinja2,
  pydantic, apscheduler, gitpython, structlog, pyrage), idle for the same time: the floor;
- the no-change poll in-process: git fetch + compare, then a whole pass (fetch, snapshot,
  render, observe, plan) when nothing changed, median of ``--polls``.

Needs dockerd and the test images. Run: ``python bench/daemon.py [--seconds 60] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.adapters.engine import DockerEngine  # noqa: E402
from agent.adapters.gitsource import GitSource  # noqa: E402
from agent.node.reconcile import reconcile_once  # noqa: E402
from agent.node.settings import Settings  # noqa: E402
from tests.dockerkit import cleanup, free_port, gpu_host  # noqa: E402

FLOOR = "import docker, httpx, jinja2, pydantic, apscheduler, git, structlog, pyrage, time; time.sleep(3600)"
TICK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--polls", type=int, default=21)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llm-agent-bench-daemon-"))
    prefix = f"b{os.getpid()}-"
    out: dict[str, Any] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        bare, work = tmp / "remote.git", tmp / "work"
        git(tmp, "init", "-q", "--bare", "-b", "main", str(bare))
        shutil.copytree(ROOT / "desired_state", work)
        (work / "hosts" / "armitage.yaml").write_text(gpu_host(free_port()))
        git(work, "init", "-q", "-b", "main")
        git(work, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "--allow-empty", "-m", "x")
        git(work, "add", "-A")
        git(work, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "bench")
        git(work, "push", "-q", str(bare), "HEAD:main")
        env = {
            **os.environ,
            "AGENT_CONFIG": str(tmp / "none.toml"),
            "AGENT_REPO": bare.as_uri(),
            "AGENT_HOST": "armitage",
            "AGENT_STATE_DIR": str(tmp / "state"),
            "AGENT_PROJECT_PREFIX": prefix,
            "AGENT_IDENTITY_FILE": str(ROOT / "examples" / "demo-identity.txt"),
        }
        daemon = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        floor = subprocess.Popen([sys.executable, "-c", FLOOR])
        procs += [daemon, floor]
        state = tmp / "state" / "state.json"
        end = time.monotonic() + 60
        while time.monotonic() < end and not (state.exists() and '"converged"' in state.read_text()):
            time.sleep(0.2)
        time.sleep(2)
        c0 = {p.pid: cpu_s(p.pid) for p in procs}
        peak = {p.pid: 0.0 for p in procs}
        t_end = time.monotonic() + args.seconds
        while time.monotonic() < t_end:
            for p in procs:
                peak[p.pid] = max(peak[p.pid], rss_mib(p.pid))
            time.sleep(1)
        out["idle_seconds"] = args.seconds
        out["daemon_rss_mib"] = rss_mib(daemon.pid)
        out["daemon_rss_peak_mib"] = peak[daemon.pid]
        out["daemon_cpu_s"] = cpu_s(daemon.pid) - c0[daemon.pid]
        out["floor_rss_mib"] = rss_mib(floor.pid)
        out["floor_cpu_s"] = cpu_s(floor.pid) - c0[floor.pid]
        out["rss_ratio_to_floor"] = out["daemon_rss_peak_mib"] / out["floor_rss_mib"]
        out["rss_target_mib"] = 60

        source = GitSource(bare.as_uri(), "main", tmp / "poll")
        head = source.fetch()
        fetches = []
        for _ in range(args.polls):
            t = time.perf_counter()
            assert source.fetch() == head
            fetches.append(time.perf_counter() - t)
        out["poll_fetch_compare_ms"] = statistics.median(fetches) * 1000
        settings = Settings(
            host="armitage",
            state_dir=tmp / "state-bench",
            project_prefix=prefix,
            identity_file=ROOT / "examples" / "demo-identity.txt",
            secrets_file=tmp / "none.yaml",
        )
        passes = []
        with DockerEngine() as engine:
            for _ in range(args.polls):
                t = time.perf_counter()
                sha = source.fetch()
                snap = source.snapshot(sha)
                result = reconcile_once(settings, engine, snap.path, sha)
                passes.append(time.perf_counter() - t)
                assert result.result == "converged", result.error
        out["poll_full_pass_ms"] = statistics.median(passes) * 1000
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        cleanup(prefix)
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"idle daemon over {out['idle_seconds']:.0f}s: RSS {out['daemon_rss_mib']:.1f} MiB "
            f"(peak {out['daemon_rss_peak_mib']:.1f}; target 60), CPU {out['daemon_cpu_s']:.2f}s"
        )
        print(
            f"import floor (same libraries, idle): RSS {out['floor_rss_mib']:.1f} MiB, CPU {out['floor_cpu_s']:.2f}s; "
            f"daemon/floor RSS ratio {out['rss_ratio_to_floor']:.2f}"
        )
        print(
            f"no-change poll: fetch + compare {out['poll_fetch_compare_ms']:.1f} ms; "
            f"whole pass (fetch, snapshot, render, observe, plan) {out['poll_full_pass_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
