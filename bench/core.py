"""Benchmark: the pure core on the shipped example fleet.

Reports (median of N runs):
- in-process time of load + validate (lint) + render + plan for one host (target < 50 ms);
- wall time of ``agent validate`` as a fresh process, interpreter start included (target < 1 s).

Run: ``python bench/core.py`` (``--runs N``, ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.adapters.secrets import SecretResolver  # noqa: E402
from agent.core.lint import lint_fleet, lint_stack  # noqa: E402
from agent.core.observed import Observed  # noqa: E402
from agent.core.plan import plan  # noqa: E402
from agent.desired.load import load_desired  # noqa: E402
from agent.desired.render import render_host  # noqa: E402

REPO = ROOT / "desired_state"
IDENTITY = ROOT / "examples" / "demo-identity.txt"


def one_host(host: str) -> float:
    start = time.perf_counter()
    desired = load_desired(REPO)
    resolver = SecretResolver.for_repo(REPO, identity=IDENTITY)
    lint_fleet(desired)
    rendered = render_host(desired, host, resolver, reveal=True)
    lint_stack(desired, rendered)
    plan(rendered.stack, Observed(), desired.roles[rendered.role].spec.on_config_change)
    return time.perf_counter() - start


def cli_validate() -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "agent.cli", "validate", "--repo", str(REPO)], check=True, capture_output=True
    )
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    one_host("motoko")  # warm imports and caches, as a long-running agent would be
    results = {}
    for host in ("motoko", "armitage"):
        results[f"core_{host}_ms"] = statistics.median(one_host(host) for _ in range(args.runs)) * 1000
    results["cli_validate_s"] = statistics.median(cli_validate() for _ in range(max(5, args.runs // 4)))
    results["target_core_ms"] = 50.0
    results["target_cli_s"] = 1.0
    results["core_motoko_vs_target"] = results["core_motoko_ms"] / 50.0
    results["cli_vs_target"] = results["cli_validate_s"] / 1.0
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"validate+render+plan, motoko (in-process, median): {results['core_motoko_ms']:.1f} ms "
            f"(target 50 ms; ratio {results['core_motoko_vs_target']:.2f})"
        )
        print(f"validate+render+plan, armitage (in-process, median): {results['core_armitage_ms']:.1f} ms")
        print(
            f"agent validate, whole fleet, new process (median): {results['cli_validate_s'] * 1000:.0f} ms "
            f"(target 1000 ms; ratio {results['cli_vs_target']:.2f})"
        )


if __name__ == "__main__":
    main()
