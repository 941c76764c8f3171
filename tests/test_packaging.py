"""The wheel carries the roles: an agent installed with pip (as agent.service runs it)
validates and renders the shipped fleet from outside the source tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_installed_wheel_finds_its_roles(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    wheel = next(wheels.glob("*.whl"))
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True
    )
    out = subprocess.run(
        [
            str(venv / "bin" / "agent"),
            "render",
            "--host",
            "motoko",
            "--repo",
            str(ROOT / "desired_state"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / "config" / "config.yaml").is_file()
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import agent.desired.roles as r; print(r.BUILTIN_ROLES)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(venv) in where
