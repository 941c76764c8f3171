"""Logging: structlog, JSON for journald and files, readable on a terminal.

Every line of a reconcile pass carries its ``run_id`` (bound in a context variable by the
pass). A ``Redactor`` replaces every secret value the agent has resolved with
``**REDACTED**`` in every field of every line, whatever code logged it.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from agent.adapters.secrets import REDACTED


class Redactor:
    """A structlog processor that blanks known secret values (thread-safe)."""

    def __init__(self) -> None:
        self._values: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if len(value) >= 4:
            with self._lock:
                self._values = self._values | {value}

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if not self._values:
            return event
        for key, value in list(event.items()):
            if isinstance(value, str):
                event[key] = self.scrub(value)
            elif isinstance(value, list | tuple | dict):
                event[key] = self.scrub(repr(value))
        return event


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
