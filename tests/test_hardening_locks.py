"""Pass locks and the state dir: one pass per host and engine, whatever the state dir; nothing
the agent opens follows a planted symlink."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.core.outcomes import Failure, PassOutcome
from agent.node.reconcile import PassResult, reconcile_once
from agent.node.settings import Settings
from agent.testing.fakes import FakeEngine
from tests.conftest import DEMO_IDENTITY


def _settings(tmp: Path, repo: Path, state: str) -> Settings:
    return Settings(
        host="armitage",
        repo=str(repo),
        state_dir=tmp / state,
        identity_file=DEMO_IDENTITY,
        secrets_file=tmp / "none.yaml",
        health_timeout=30,
    )


def test_two_state_dirs_on_one_host_do_not_interleave(tmp_path: Path, repo: Path) -> None:
    engine = FakeEngine(any_image=True)
    inside, release = threading.Event(), threading.Event()

    def block(project: str) -> None:
        inside.set()
        assert release.wait(10)

    engine.on("observe", block)
    first: list[PassResult] = []
    t = threading.Thread(target=lambda: first.append(reconcile_once(_settings(tmp_path, repo, "s1"), engine)))
    t.start()
    try:
        assert inside.wait(10)
        engine.on("observe", lambda project: None)
        second = reconcile_once(_settings(tmp_path, repo, "s2"), engine)
        seen = engine.ops("observe")
    finally:
        release.set()
        t.join(10)
    assert second.failure is Failure.LOCKED, second.error
    assert second.error is not None and "another pass is running on this host" in second.error
    assert seen == ["armitage"]  # the second pass never reached the engine
    assert first[0].result is PassOutcome.CONVERGED, first[0].error


def test_other_hosts_and_prefixes_do_not_wait(tmp_path: Path, repo: Path) -> None:
    engine = FakeEngine(any_image=True)
    inside, release = threading.Event(), threading.Event()

    def block(project: str) -> None:
        if project == "armitage":
            inside.set()
            assert release.wait(10)

    engine.on("observe", block)
    t = threading.Thread(target=lambda: reconcile_once(_settings(tmp_path, repo, "s1"), engine))
    t.start()
    try:
        assert inside.wait(10)
        other = _settings(tmp_path, repo, "s2").model_copy(update={"project_prefix": "t1-"})
        result = reconcile_once(other, engine)
    finally:
        release.set()
        t.join(10)
    assert result.failure is not Failure.LOCKED, result.error


def test_lock_dir_is_private(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o777)
    os.chmod(lock_dir, 0o777)
    monkeypatch.setenv("AGENT_LOCK_DIR", str(lock_dir))
    result = reconcile_once(_settings(tmp_path, repo, "s1"), FakeEngine(any_image=True))
    assert result.failure is not None, result.error
    assert result.error is not None and "writable by group or others" in result.error


def _one_line(error: str | None) -> str:
    assert error is not None and "\n" not in error and "Traceback" not in error, error
    return error


def test_a_symlinked_pass_lock_is_not_followed(tmp_path: Path, repo: Path) -> None:
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    state = tmp_path / "s1"
    state.mkdir(mode=0o700)
    (state / "pass.lock").symlink_to(victim)
    engine = FakeEngine(any_image=True)
    result = reconcile_once(_settings(tmp_path, repo, "s1"), engine)
    assert victim.read_text() == "precious\n"
    assert "symlink" in _one_line(result.error)
    assert result.result is PassOutcome.FAILED and not engine.ops("observe")


def test_a_symlinked_machine_lock_is_not_followed(tmp_path: Path, repo: Path) -> None:
    from agent.adapters.fs import machine_lock_dir
    from agent.node.reconcile import host_lock_key

    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    settings = _settings(tmp_path, repo, "s1")
    (machine_lock_dir() / f"pass-{host_lock_key(settings)}.lock").symlink_to(victim)
    result = reconcile_once(settings, FakeEngine(any_image=True))
    assert victim.read_text() == "precious\n"
    assert "symlink" in _one_line(result.error)


def test_a_group_writable_state_dir_is_refused(tmp_path: Path, repo: Path) -> None:
    state = tmp_path / "s1"
    state.mkdir()
    state.chmod(0o770)
    engine = FakeEngine(any_image=True)
    result = reconcile_once(_settings(tmp_path, repo, "s1"), engine)
    assert "writable by group or others" in _one_line(result.error)
    assert result.result is PassOutcome.FAILED and not engine.ops("observe")
    assert not (state / "pass.lock").exists()


def test_a_symlinked_state_dir_is_refused(tmp_path: Path, repo: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (tmp_path / "s1").symlink_to(real)
    engine = FakeEngine(any_image=True)
    result = reconcile_once(_settings(tmp_path, repo, "s1"), engine)
    assert "not a directory (a symlink?)" in _one_line(result.error)
    assert result.result is PassOutcome.FAILED and not engine.ops("observe")
    assert list(real.iterdir()) == []
