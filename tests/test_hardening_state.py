"""A corrupt state file is set aside once, with a warning, and the agent heals on a fresh state."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.cli.commands import main
from agent.core.outcomes import PassOutcome
from agent.node.state import StateStore
from tests.test_daemon_fake import A, Fleet


def _corrupt(state_dir: Path) -> None:
    (state_dir / "state.json").write_text('{"applied_commit": "aaaa", "runs": [trunc')


def test_a_corrupt_state_file_is_set_aside_and_the_daemon_heals(tmp_path: Path, repo: Path) -> None:
    fleet = Fleet(tmp_path, repo)
    fleet.push(A)
    assert fleet.daemon.one_pass().result is PassOutcome.CONVERGED  # type: ignore[union-attr]
    state_dir = fleet.settings.state_dir
    _corrupt(state_dir)
    with capture_logs() as logs:
        first = fleet.daemon.one_pass()
        second = fleet.daemon.one_pass()
    assert first is not None and first.result is PassOutcome.CONVERGED, first and first.error
    assert second is not None and second.result is PassOutcome.CONVERGED
    aside = sorted(state_dir.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and "trunc" in aside[0].read_text()
    assert [e for e in logs if e.get("log_level") == "warning" and "state" in e["event"]].__len__() == 1, logs
    assert StateStore(state_dir).load().applied_commit == A
    note = fleet.daemon.status()["state_reset"]
    assert aside[0].name in note and "fresh" in note


def test_status_says_so_while_the_daemon_is_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    _corrupt(state_dir)
    code = main(["status", "--state-dir", str(state_dir)])
    out, err = capsys.readouterr()
    assert code == 3, err  # not running: a clear state, not an error
    assert "Traceback" not in err and "error:" not in err
    assert "state.json" in out and "corrupt" in out and "fresh" in out
