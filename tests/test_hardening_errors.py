"""Any unexpected exception is one line (the CLI) or one JSON line (the daemon's journal)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.cli import commands
from agent.cli.commands import main
from agent.daemon import logs


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_an_unexpected_exception_is_one_line(tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.write_text("a file where the output directory should go")
    assert main(["render", "--host", "motoko", "--repo", str(repo), "--out", str(out)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: FileExistsError: ") and str(out) in line


def test_a_multi_line_message_is_folded(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: Any, settings: Any) -> int:
        raise RuntimeError("first\n  second\n")

    monkeypatch.setattr(commands, "cmd_status", broken)
    assert main(["status"]) == 1
    assert _one_line(capsys.readouterr().err) == "error: RuntimeError: first; second"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path: Path, repo: Path, where: str) -> None:
    out = tmp_path / "out"
    out.write_text("x")
    argv = ["render", "--host", "motoko", "--repo", str(repo), "--out", str(out)]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(FileExistsError):
        main(argv)


def test_user_errors_stay_one_clean_line_with_debug(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "run", "--config", str(tmp_path / "missing.toml")]) == 1
    assert _one_line(capsys.readouterr().err).startswith("error: ")


# -- the daemon's journal -------------------------------------------------------------------


@pytest.fixture
def journal() -> Iterator[io.StringIO]:
    yield io.StringIO()
    structlog.reset_defaults()
    logs.configure(stream=io.StringIO(), json=True)  # detach the stdlib handler from the buffer


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _crash(log: Any) -> None:
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        log.exception("pass crashed")


def test_log_exception_is_one_json_line_with_the_error(journal: io.StringIO) -> None:
    logs.configure(stream=journal, json=True, level="info")
    _crash(structlog.get_logger("t"))
    (line,) = _lines(journal)
    assert line["event"] == "pass crashed"
    assert line["error"] == "ValueError: bad value; second line"
    assert "exception" not in line and "Traceback" not in journal.getvalue()


def test_the_traceback_only_at_debug(journal: io.StringIO) -> None:
    logs.configure(stream=journal, json=True, level="debug")
    _crash(structlog.get_logger("t"))
    (line,) = _lines(journal)
    assert line["error"] == "ValueError: bad value; second line"
    assert "Traceback" in line["exception"] and "_crash" in line["exception"]


def test_apscheduler_lines_are_json(journal: io.StringIO) -> None:
    redactor = logs.configure(stream=journal, json=True, level="info")
    redactor.add("hunter2-secret")
    logging.getLogger("apscheduler.executors.default").info("Running job %s", "reconcile")  # every pass: not kept
    logging.getLogger("apscheduler.scheduler").warning("Run time of job %s was missed by %s", "hunter2-secret", 3)
    try:
        raise OSError("engine gone")
    except OSError:
        logging.getLogger("apscheduler.executors.default").exception('Job "reconcile" raised an exception')
    missed, crashed = _lines(journal)
    assert missed["event"] == "Run time of job **REDACTED** was missed by 3"
    assert missed["level"] == "warning" and missed["logger"] == "apscheduler.scheduler"
    assert "timestamp" in missed
    assert crashed["level"] == "error" and crashed["error"] == "OSError: engine gone"
    assert "Traceback" not in journal.getvalue()


def test_apscheduler_info_lines_at_debug(journal: io.StringIO) -> None:
    logs.configure(stream=journal, json=True, level="debug")
    logging.getLogger("apscheduler.executors.default").info("Running job %s", "reconcile")
    (line,) = _lines(journal)
    assert line["level"] == "info" and line["event"] == "Running job reconcile"


def test_the_skipped_warning_is_debug(journal: io.StringIO) -> None:
    skipped = 'Execution of job "%s" skipped: maximum number of running instances reached (%d)'
    logs.configure(stream=journal, json=True, level="info")
    logging.getLogger("apscheduler.scheduler").warning(skipped, "reconcile", 1)
    assert journal.getvalue() == ""
    logs.configure(stream=journal, json=True, level="debug")
    logging.getLogger("apscheduler.scheduler").warning(skipped, "reconcile", 1)
    (line,) = _lines(journal)
    assert line["level"] == "debug" and "skipped" in line["event"]


def test_configure_twice_does_not_duplicate_lines(journal: io.StringIO) -> None:
    logs.configure(stream=journal, json=True)
    logs.configure(stream=journal, json=True)
    logging.getLogger("apscheduler").error("once")
    assert len(_lines(journal)) == 1
