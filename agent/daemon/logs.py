"""Logging: structlog, JSON for journald and files, readable on a terminal.

Every line of a reconcile pass carries its ``run_id`` (bound in a context variable by the
pass). A ``Redactor`` replaces every secret value the agent has resolved with
``**REDACTED**`` in every field of every line, whatever code logged it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from agent.core.redact import Redactor

__all__ = ["Redactor", "configure"]


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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return redactor
