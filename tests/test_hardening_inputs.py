"""Flags and settings that used to skip validation: one clear line, exit 1, nothing done."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli.commands import main
from agent.core.errors import ConfigError
from agent.node.settings import load_settings
from tests.conftest import one_line_error


@pytest.mark.parametrize("value", ["-5", "0", "0.01", "nan", "inf", "soon"])
def test_health_timeout_flag_is_validated(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["apply", "--repo", str(tmp_path / "absent"), "--state-dir", str(tmp_path / "s"), "--health-timeout", value]
    )
    assert code == 1
    line = one_line_error(capsys.readouterr().err)
    assert "--health-timeout" in line and value in line
    assert not (tmp_path / "s").exists()  # refused before anything is touched


@pytest.mark.parametrize("value", [0.01, 0.5])
def test_health_timeout_setting_has_a_sane_minimum(value: float) -> None:
    with pytest.raises(ConfigError, match="health_timeout"):
        load_settings(environ={"AGENT_CONFIG": "/nonexistent"}, health_timeout=value)


@pytest.mark.parametrize("prefix", ["../../", "a/b", "Test-", "-x", "_x", "a b", "x" * 40, "é-", "a\n"])
def test_project_prefix_is_validated(prefix: str) -> None:
    with pytest.raises(ConfigError, match="project_prefix") as caught:
        load_settings(environ={"AGENT_CONFIG": "/nonexistent"}, project_prefix=prefix)
    assert repr(prefix) in str(caught.value) or prefix in str(caught.value)


@pytest.mark.parametrize("prefix", ["", "t1-", "ci_run-7", "x"])
def test_good_project_prefixes_pass(prefix: str) -> None:
    assert load_settings(environ={"AGENT_CONFIG": "/nonexistent"}, project_prefix=prefix).project_prefix == prefix


def test_prefix_flag_names_the_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["apply", "--repo", str(tmp_path), "--state-dir", str(tmp_path / "s"), "--prefix", "../../"])
    assert code == 1
    assert "../../" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


def test_plan_takes_the_state_dir_apply_uses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """plan compares the stack files on disk, so it reads the same state dir as apply."""
    from agent.cli.commands import _parser

    args = _parser().parse_args(["plan", "--host", "armitage", "--state-dir", str(tmp_path / "s")])
    assert args.state_dir == tmp_path / "s"
