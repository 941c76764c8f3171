"""The daemon's rules through the public fakes (``agent.testing``): no Docker, no git, no sleeps.
Last-good healing, quarantine, trigger coalescing, pause, shutdown mid-rollout, SHA-256 commits,
and secrets kept out of errors, status and the state file."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.adapters.systemd import Notifier
from agent.core.errors import EngineError
from agent.core.outcomes import Failure, PassOutcome
from agent.daemon.service import NO_DUTIES, Daemon, set_pause
from agent.testing.fakes import FakeClock, FakeContainer, FakeEngine, FakeSource
from tests.conftest import fake_settings

A, B, C = "a" * 40, "b" * 40, "c" * 40


class Fleet:
    """A daemon for host armitage over a fake source and a fake engine."""

    def __init__(self, tmp: Path, repo: Path, behaviour: Callable[[FakeContainer], str] | None = None) -> None:
        self.tmp, self.repo = tmp, repo
        self.engine = FakeEngine(any_image=True, behaviour=behaviour)
        self.source = FakeSource()
        self.clock = FakeClock()
        self.settings = fake_settings("armitage", tmp, repo)
        self.daemon = Daemon(
            self.settings,
            notifier=Notifier({}),
            engine_factory=lambda: self.engine,
            source=self.source,
            clock=self.clock,
            duties=NO_DUTIES,
        )

    def push(self, commit: str, edit: Callable[[Path], None] | None = None) -> None:
        path = self.tmp / "commits" / commit
        shutil.copytree(self.repo, path)
        if edit is not None:
            edit(path)
        self.source.push(commit, path)

    def vllm(self) -> list[FakeContainer]:
        return [c for c in self.engine.containers.values() if c.labels.get("com.docker.compose.service") == "vllm"]


def host_edit(text: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        f = path / "hosts" / "armitage.yaml"
        f.write_text(f.read_text() + text)

    return edit


@pytest.fixture
def fleet(tmp_path: Path, repo: Path) -> Fleet:
    return Fleet(tmp_path, repo)


def test_a_push_is_applied_and_recorded(fleet: Fleet) -> None:
    fleet.push(A)
    result = fleet.daemon.one_pass()
    assert result is not None and result.result is PassOutcome.CONVERGED, result and result.error
    assert fleet.daemon.store.load().applied_commit == A
    assert [c.state for c in fleet.vllm()] == ["running"]
    status = fleet.daemon.status()
    assert status["applied_commit"] == A and status["services"][0]["state"] == "running"
    assert 'llm_agent_runs_total{result="converged"} 1.0' in fleet.daemon.metrics()


def test_a_bad_head_keeps_healing_the_last_good_commit(fleet: Fleet) -> None:
    fleet.push(A)
    fleet.daemon.one_pass()
    [old] = fleet.vllm()
    fleet.engine.remove(old.id)  # drift: someone removed the container
    fleet.push(B, host_edit("  max_model_lenght: 4096\n"))
    result = fleet.daemon.one_pass()
    assert result is not None and result.failure is Failure.DESIRED_STATE
    assert "unknown key 'max_model_lenght'" in (result.error or "")
    assert [c.state for c in fleet.vllm()] == ["running"], "healed on the last good commit"
    assert fleet.daemon.store.load().applied_commit == A
    assert "llm_agent_drift_corrections_total 1.0" in fleet.daemon.metrics()


def test_a_version_that_does_not_come_up_is_rolled_back_and_quarantined(tmp_path: Path, repo: Path) -> None:
    fleet = Fleet(tmp_path, repo, behaviour=lambda c: "exit" if "broken" in c.image else "healthy")
    fleet.push(A)
    fleet.daemon.one_pass()
    [old] = fleet.vllm()
    fleet.push(B, host_edit("  vllm_image: vllm/broken:1\n"))
    first = fleet.daemon.one_pass()
    assert first is not None and first.failure is Failure.ROLLOUT
    assert [c.id for c in fleet.vllm()] == [old.id] and old.state == "running"
    creates = len(fleet.engine.ops("create"))
    again = fleet.daemon.one_pass()
    assert again is not None and again.failure is Failure.QUARANTINED
    assert len(fleet.engine.ops("create")) == creates, "a quarantined version is not retried"
    assert fleet.daemon.status()["quarantined"]
    fleet.push(C, host_edit("  vllm_image: vllm/fixed:1\n"))  # a change lifts it
    fixed = fleet.daemon.one_pass()
    assert fixed is not None and fixed.result is PassOutcome.CONVERGED, fixed and fixed.error


def test_triggers_during_a_pass_coalesce_into_one_more_pass(fleet: Fleet) -> None:
    fleet.push(A)
    inside, release = threading.Event(), threading.Event()
    passes: list[int] = []

    def hold(project: str) -> None:
        passes.append(1)
        if len(passes) == 1:
            inside.set()
            assert release.wait(10)

    fleet.engine.on("observe", hold)
    worker = threading.Thread(target=fleet.daemon.reconcile_job)
    worker.start()
    assert inside.wait(10)
    notes = [fleet.daemon.trigger() for _ in range(3)]
    assert all("another follows" in n.get("note", "") for n in notes)
    release.set()
    worker.join(10)
    runs = fleet.daemon.store.load().runs
    assert len(runs) == 2, "three triggers during a pass make exactly one more pass"


def test_pause_stops_applying_until_resumed(fleet: Fleet) -> None:
    fleet.push(A)
    set_pause(fleet.daemon.store, "maintenance")
    assert fleet.daemon.one_pass() is None
    assert fleet.engine.calls == []
    set_pause(fleet.daemon.store, None)
    result = fleet.daemon.one_pass()
    assert result is not None and result.result is PassOutcome.CONVERGED


def test_a_shutdown_mid_rollout_rolls_back_without_quarantine(tmp_path: Path, repo: Path) -> None:
    fleet = Fleet(tmp_path, repo, behaviour=lambda c: "starting" if "slow" in c.image else "healthy")
    fleet.push(A)
    fleet.daemon.one_pass()
    [old] = fleet.vllm()
    fleet.push(B, host_edit("  vllm_image: vllm/slow:1\n"))
    fleet.engine.on("state", lambda cid: fleet.daemon.stop_event.set())  # SIGTERM while waiting
    result = fleet.daemon.one_pass()
    assert result is not None and result.failure is Failure.STOPPED
    assert [c.id for c in fleet.vllm()] == [old.id] and old.state == "running"
    assert fleet.daemon.store.load().quarantine == {}


def test_an_unreachable_remote_stays_on_a_sha256_last_good_commit(fleet: Fleet) -> None:
    good = "d" * 64  # a SHA-256 repository
    fleet.push(good)
    fleet.daemon.one_pass()
    assert fleet.daemon.store.load().applied_commit == good
    [old] = fleet.vllm()
    fleet.engine.remove(old.id)
    fleet.source.unreachable = "connection refused"
    result = fleet.daemon.one_pass()
    assert result is not None and result.commit == good and result.result is PassOutcome.CONVERGED
    assert fleet.daemon.status()["source"]["error"] == "connection refused"
    assert [c.state for c in fleet.vllm()] == ["running"]


def test_an_unavailable_engine_is_dropped_and_reconnected(fleet: Fleet) -> None:
    fleet.push(A)
    fleet.engine.unavailable = True
    result = fleet.daemon.one_pass()
    assert result is not None and result.failure is Failure.ENGINE_UNAVAILABLE
    assert ("close", "") in fleet.engine.calls
    fleet.engine.unavailable = False
    result = fleet.daemon.one_pass()
    assert result is not None and result.result is PassOutcome.CONVERGED


def test_a_secret_in_an_engine_error_reaches_no_status_and_no_state_file(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "sk-canary-0123456789"
    monkeypatch.setenv("AGENT_SECRET_OPENAI_API_KEY", canary)
    fleet = Fleet(tmp_path, repo)
    fleet.settings = fleet.settings.model_copy(update={"host": "motoko"})
    fleet.daemon.settings = fleet.settings
    fleet.push(A)
    fleet.engine.fail_next("create", EngineError(f"create container litellm: bad env OPENAI_API_KEY={canary}"))
    result = fleet.daemon.one_pass()
    assert result is not None and result.error and "REDACTED" in result.error
    assert canary not in str(fleet.daemon.status())
    assert canary not in (tmp_path / "state" / "state.json").read_text()
