"""kill -9 of `agent apply` at random moments of a rollout, then the operator's worst follow-ups
(the stack files deleted, a new state dir): the next pass always converges, with one container
per service, a valid state file, and the running proxy mounting exactly the desired config."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dockerkit import Fleet, docker

pytestmark = pytest.mark.docker

AFTERMATH = ("rerun", "stack files deleted", "new state dir")
RUNS = [(i, AFTERMATH[i % len(AFTERMATH)]) for i in range(6)]


def _apply_args(fleet: Fleet, state: Path) -> list[str]:
    return ["apply", *fleet.args("motoko"), "--state-dir", str(state), "--json"]


def _apply(fleet: Fleet, state: Path) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", *_apply_args(fleet, state)], capture_output=True, text=True, check=False
    )
    return proc.returncode, json.loads(proc.stdout or "{}")


@pytest.mark.parametrize(("run", "aftermath"), RUNS, ids=[f"{i}-{a.replace(' ', '-')}" for i, a in RUNS])
def test_kill_9_at_a_random_moment_then_the_next_pass_converges(fleet: Fleet, run: int, aftermath: str) -> None:
    rng = random.Random(run)
    code, out = _apply(fleet, fleet.state)
    assert code == 0, out
    # A change that replaces the proxy (workers) and one that reloads it (budget), together.
    fleet.edit("hosts/motoko.yaml", "litellm_port:", "litellm_workers: 2\n  litellm_port:")
    fleet.edit("fleet.yaml", "openai_budget_monthly_usd: 150", "openai_budget_monthly_usd: 555")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *_apply_args(fleet, fleet.state)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    time.sleep(rng.uniform(0.2, 4.0))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = fleet.state
    if aftermath == "stack files deleted":
        shutil.rmtree(state / "stacks", ignore_errors=True)
    elif aftermath == "new state dir":
        state = fleet.state.parent / "state-new"
    code, out = _apply(fleet, state)
    assert code == 0, out
    names = sorted(c["name"] for c in fleet.containers("motoko"))
    assert names == [f"{fleet.prefix}litellm", f"{fleet.prefix}motoko-haproxy-1", f"{fleet.prefix}motoko-redis-1"], (
        names
    )
    json.loads((state / "state.json").read_text())  # valid, whole
    mounted = docker("exec", f"{fleet.prefix}litellm", "cat", "/app/config/config.yaml")
    assert "budget_limit: 555" in mounted, mounted
    again, _ = _apply(fleet, state)
    assert again == 0


@pytest.mark.parametrize("aftermath", ["stack files deleted", "new state dir"])
def test_a_converged_host_whose_stack_files_vanish_is_not_converged(fleet: Fleet, aftermath: str) -> None:
    """Silent divergence: the state dir's files deleted (or a new state dir) after a converged
    pass; the next pass must put the files back and the proxy must mount them."""
    fleet.edit("fleet.yaml", "openai_budget_monthly_usd: 150", "openai_budget_monthly_usd: 304")
    code, out = _apply(fleet, fleet.state)
    assert code == 0, out
    fleet.edit("fleet.yaml", "openai_budget_monthly_usd: 304", "openai_budget_monthly_usd: 555")
    state = fleet.state
    if aftermath == "stack files deleted":
        shutil.rmtree(state / "stacks")
    else:
        state = fleet.state.parent / "state-new"
    plan = subprocess.run(
        [sys.executable, "-m", "agent.cli", "plan", *fleet.args("motoko"), "--json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "AGENT_STATE_DIR": str(state)},
    )
    assert plan.returncode == 2, plan.stdout  # changes pending, never "converged"
    code, out = _apply(fleet, state)
    assert code == 0, out
    mounted = docker("exec", f"{fleet.prefix}litellm", "cat", "/app/config/config.yaml")
    assert "budget_limit: 555" in mounted, mounted
