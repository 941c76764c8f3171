"""Benchmark: the motoko agent's fleet API under 1,000 simulated agents.

The API (``agent.fleet.api.FleetApi``, its SQLite store on disk) runs in a child process, so its
CPU time is its own (read from ``/proc``); the simulated agents are client threads here, each
report a fresh TCP connection (an agent reporting every 10 s does not keep one open), each
agent with its own host name and token, each report a realistic gpu_node report (~1.5 KB).

- ``paced``: what the fleet does: 1,000 agents every 10 s = 100 reports/s, for ``--reports``
  reports: p50/p99/max latency of ``POST /v1/reports`` and the server's CPU in cores (target:
  p99 under 50 ms, under half a core);
- ``burst``: the same reports as fast as ``--threads`` clients can send them: throughput and
  latency under overload;
- then ``GET /v1/fleet`` with 1,000 hosts in it, and ``GET /metrics``.

Run: ``python bench/fleet_api.py [--agents 1000] [--reports 2000] [--rate 100] [--threads 8]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TICK = os.sysconf("SC_CLK_TCK")


def host(i: int) -> str:
    return f"gpu-{i:04d}"


def token(i: int) -> str:
    return f"bench-token-{i:04d}-0123456789abcdef"


def serve(db: Path, agents: int, port_file: Path) -> None:
    """The child: the API until stdin closes."""
    import structlog

    from agent.fleet.api import FleetApi

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    api = FleetApi(db, {host(i): token(i) for i in range(agents)})
    api.start()
    port_file.write_text(str(api.address[1]))
    sys.stdin.read()
    api.close()


def report(i: int, boot_id: str, seq: int) -> bytes:
    checks = [
        {"name": "health", "ok": True, "ms": 1.2},
        {"name": "models", "ok": True, "ms": 2.5},
        {"name": "canary", "ok": True, "ms": 41.0},
        {"name": "metrics", "ok": True, "ms": 1.9},
    ]
    gpu = {
        "name": "NVIDIA H200",
        "uuid": f"GPU-{i:08d}-0000-0000-0000-000000000000",
        "memory_total_bytes": 150_000_000_000,
        "memory_used_bytes": 120_000_000_000,
        "temperature_c": 41,
        "power_w": 350.5,
        "power_limit_w": 700.0,
        "utilization_pct": 63,
        "ecc_uncorrected": 0,
        "remap_failure": False,
        "retired_pages_pending": False,
        "processes": 1,
    }
    data = {
        "host": host(i),
        "role": "gpu_node",
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "stage": "ready",
        "health": {"checks": checks, "load": {"running": 3, "waiting": 0}},
        "gpu": {
            "status": "ok",
            "driver_version": "550.54.15",
            "requested": 2,
            "visible": 2,
            "gpus": [{**gpu, "index": 0}, {**gpu, "index": 1}],
        },
        "services": {"vllm": "running"},
        "boot_id": boot_id,
        "seq": seq,
        "sent_at": time.time(),
        "agent_version": "0.1.0",
    }
    return json.dumps(data).encode()


class Agents:
    """The simulated agents: report ``n`` goes from agent ``n % agents``, with its next seq."""

    def __init__(self, agents: int) -> None:
        self.agents = agents
        self.boots = [secrets.token_hex(8) for _ in range(agents)]
        self.seqs = [0] * agents
        self.lock = threading.Lock()

    def next(self, n: int) -> tuple[int, bytes]:
        i = n % self.agents
        with self.lock:
            self.seqs[i] += 1
            seq = self.seqs[i]
        return i, report(i, self.boots[i], seq)


def post(port: int, i: int, body: bytes) -> tuple[float, int]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST",
            "/v1/reports",
            body,
            {"Authorization": f"Bearer {token(i)}", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        response.read()
        return time.perf_counter() - started, response.status
    finally:
        conn.close()


def get(port: int, route: str) -> tuple[float, int]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", route)
        size = len(conn.getresponse().read())
        return time.perf_counter() - started, size
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def run(
    port: int, pid: int, agents: Agents, reports: int, threads: int, rate: float | None, offset: int
) -> dict[str, Any]:
    """``reports`` reports from ``threads`` clients, at ``rate`` per second (None: flat out)."""
    latencies: list[float] = []
    failures: list[int] = []
    counter = iter(range(reports))
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.05

    def client() -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            if rate:
                time.sleep(max(0.0, t0 + n / rate - time.perf_counter()))
            i, body = agents.next(offset + n)
            seconds, status = post(port, i, body)
            with lock:
                latencies.append(seconds)
                if status != 200:
                    failures.append(status)

    cpu0 = cpu_seconds(pid)
    started = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu0
    latencies.sort()

    def ms(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2)

    return {
        "reports": reports,
        "threads": threads,
        "rate_target": rate,
        "rate": round(reports / wall, 1),
        "failed": len(failures),
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "max_ms": round(latencies[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
        "server_cpu_cores": round(cpu / wall, 3),
        "server_cpu_ms_per_report": round(cpu / reports * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--reports", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", nargs=2, metavar=("DB", "PORT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), args.agents, Path(args.serve[1]))
        return
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        db, port_file = Path(tmp) / "fleet.sqlite", Path(tmp) / "port"
        child = subprocess.Popen(
            [sys.executable, __file__, "--agents", str(args.agents), "--serve", str(db), str(port_file)],
            stdin=subprocess.PIPE,
        )
        try:
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.05)
            port = int(port_file.read_text())
            agents = Agents(args.agents)
            results = {
                "paced": run(port, child.pid, agents, args.reports, args.threads, args.rate, 0),
                "burst": run(port, child.pid, agents, args.reports, args.threads, None, args.reports),
            }
            fleet_s, fleet_bytes = get(port, "/v1/fleet")
            metrics_s, metrics_bytes = get(port, "/metrics")
            results["reads"] = {
                "fleet_ms": round(fleet_s * 1000, 1),
                "fleet_bytes": fleet_bytes,
                "metrics_ms": round(metrics_s * 1000, 1),
                "metrics_bytes": metrics_bytes,
                "db_bytes": sum(p.stat().st_size for p in Path(tmp).glob("fleet.sqlite*")),
            }
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=10)
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, r in results.items():
        print(f"{name:7} " + "  ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
