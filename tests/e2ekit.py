"""The demo fleet for the end-to-end tests: ``scripts/demo`` brought up once per test session,
shared by every e2e module (tests/test_e2e_fleet.py, then tests/test_e2e_fleet_drain.py: file
order), and removed with ``scripts/demo down`` at the end, the agents' logs kept.

Each e2e test leaves the fleet as the next one expects, also when it fails (it resumes what it
paused, pushes back what it broke); a module that needs other settings pushes them itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo"


def demo_env(home: Path) -> dict[str, str]:
    return {**os.environ, "LLM_AGENT_DEMO": str(home)}


def keep_logs(home: Path) -> None:
    """The agents' logs, kept for a failed run (``$LLM_AGENT_ARTIFACTS`` or tests/artifacts/)."""
    out = Path(os.environ.get("LLM_AGENT_ARTIFACTS") or ROOT / "tests" / "artifacts") / home.name
    out.mkdir(parents=True, exist_ok=True)
    for log in (home / "logs").glob("*.log"):
        shutil.copy(log, out / log.name)


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The home of the demo fleet, up (``scripts/demo``) for the whole session."""
    home = tmp_path_factory.mktemp("demo")
    up = subprocess.run([str(DEMO)], env=demo_env(home), text=True, capture_output=True, check=False, timeout=900)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield home
    finally:
        keep_logs(home)
        subprocess.run([str(DEMO), "down"], env=demo_env(home), check=False, capture_output=True, timeout=300)
