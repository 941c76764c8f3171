"""Logging: structlog, JSON for journald and files, readable on a terminal.

Every line of a reconcile pass carries its ``run_id`` (bound in a context variable by the
pass). A ``Redactor`` replaces every secret value the agent has resolved with
``**REDACTED**`` in every field of every line, whatever code logged it.

A logged exception is one line: ``error="Type: message"``; its traceback is added (as
``exception``) only at ``debug``. APScheduler logs through the standard library: its lines
go through the same processors (``ProcessorFormatter``), so the journal is JSON throughout.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from agent.core.errors import error_line
from agent.core.redact import Redactor

__all__ = ["Redactor", "configure", "error_line"]


class ExceptionLine:
    """A structlog processor in place of ``format_exc_info``: ``exc_info`` becomes a one-line
    ``error``, plus the whole traceback as ``exception`` when ``with_traceback``."""

    def __init__(self, with_traceback: bool) -> None:
        self.with_traceback = with_traceback

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        exc = _exception(event.pop("exc_info", None))
        if exc is not None:
            event.setdefault("error", error_line(exc))
            if self.with_traceback:
                event["exception"] = "".join(traceback.format_exception(exc)).rstrip("\n")
        return event


def _exception(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1] if len(exc_info) == 3 and isinstance(exc_info[1], BaseException) else None
    return sys.exc_info()[1] if exc_info else None


#: APScheduler's warning when a pass is still running at the next tick: expected, repetitive.
SKIPPED = "skipped: maximum number of running instances reached"


class DemoteSkipped(logging.Filter):
    """Turns APScheduler's "skipped" warning into a debug line (dropped above debug)."""

    def __init__(self, keep_debug: bool) -> None:
        super().__init__()
        self.keep_debug = keep_debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and SKIPPED in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.keep_debug
        return True


def _route_stdlib(stream: TextIO, level: int, chain: list[Any], renderer: Any) -> None:
    """APScheduler's standard-library logging through the same processors, to the same stream."""
    handler = logging.StreamHandler(stream)
    handler.set_name("agent-structlog")
    handler.addFilter(DemoteSkipped(keep_debug=level <= logging.DEBUG))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *chain],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    scheduler = logging.getLogger("apscheduler")
    for old in [h for h in scheduler.handlers if h.get_name() == "agent-structlog"]:
        scheduler.removeHandler(old)
    scheduler.addHandler(handler)
    # Its info lines ("Running job", "executed successfully") come every pass and heartbeat:
    # the agent's own lines say what a pass did, so below debug only its warnings are kept.
    scheduler.setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    scheduler.propagate = False


def configure(
    redactor: Redactor | None = None, stream: TextIO | None = None, json: bool | None = None, level: str = "info"
) -> Redactor:
    """Configure structlog once for the process; returns the redactor to feed secrets into."""
    redactor = redactor or Redactor()
    stream = stream or sys.stderr
    as_json = (not stream.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    threshold = logging.getLevelNamesMapping()[level.upper()]
    chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        ExceptionLine(with_traceback=threshold <= logging.DEBUG),
        redactor,
    ]
    structlog.configure(
        processors=[*chain, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(stream, threshold, chain, renderer)
    return redactor
