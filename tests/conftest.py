"""Shared fixtures: a writable copy of the shipped desired state, and the demo identity."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.node.settings import Settings
from tests.dockerkit import fleet  # noqa: F401  (fixture for the Docker tests)
from tests.e2ekit import demo_home  # noqa: F401  (the demo fleet of the e2e tests)
from tests.proxykit import redis_port  # noqa: F401  (fixture for the proxy tests)

ROOT = Path(__file__).resolve().parent.parent
DEMO_IDENTITY = ROOT / "examples" / "demo-identity.txt"


@pytest.fixture(autouse=True)
def _isolated_lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own machine-wide pass-lock dir (the real one is shared by the host),
    and no test logs into a stream an earlier CLI test configured (pytest closed it since)."""
    lock_dir = tmp_path / ".locks"
    lock_dir.mkdir(mode=0o700)
    monkeypatch.setenv("AGENT_LOCK_DIR", str(lock_dir))
    yield
    structlog.reset_defaults()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of ``desired_state/`` that a test may break."""
    dest = tmp_path / "desired_state"
    shutil.copytree(ROOT / "desired_state", dest)
    return dest


@pytest.fixture
def roles_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo: Path) -> Iterator[Path]:
    """Roles carried inside the test repo (``<repo>/roles``), so a test can break a template."""
    dest = repo / "roles"
    shutil.copytree(ROOT / "roles", dest)
    yield dest


@pytest.fixture(autouse=True)
def _no_host_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never read /etc/llm-agent; secrets come from the repo (demo identity) or env."""
    monkeypatch.setenv("AGENT_SECRETS_FILE", str(tmp_path / "no-secrets.yaml"))
    monkeypatch.setenv("AGENT_IDENTITY_FILE", str(DEMO_IDENTITY))
    monkeypatch.delenv("AGENT_CONFIG", raising=False)
    for var in ("AGENT_HOST", "AGENT_REPO", "AGENT_PROJECT_PREFIX"):
        monkeypatch.delenv(var, raising=False)


def fake_settings(host: str, tmp: Path, repo: Path, **extra: Any) -> Settings:
    """The settings of an agent under test on the shipped example: state under ``tmp``, the
    demo identity, no host secrets file, a 30 s health cap; ``extra`` overrides."""
    fields: dict[str, Any] = {
        "host": host,
        "repo": str(repo),
        "state_dir": tmp / "state",
        "identity_file": DEMO_IDENTITY,
        "secrets_file": tmp / "none.yaml",
        "health_timeout": 30,
    }
    return Settings(**{**fields, **extra})


def one_line_error(err: str) -> str:
    """The single ``error: ...`` line a command printed (never a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: "), err
    return lines[0]
