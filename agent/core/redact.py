"""Secret redaction: the one rule, used by the log processor, pass errors, status and render.

A value shorter than ``MIN_LEN`` is never redacted (it would blank innocent text everywhere);
longer values are replaced wherever they appear, longest first (a value containing another
is never left half-shown).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

REDACTED = "**REDACTED**"
MIN_LEN = 4


def scrub(text: str, values: Iterable[str]) -> str:
    for value in sorted({v for v in values if len(v) >= MIN_LEN}, key=len, reverse=True):
        if value in text:
            text = text.replace(value, REDACTED)
    return text


class Redactor:
    """Known secret values, and a structlog processor that blanks them in every field."""

    def __init__(self) -> None:
        self._values: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if len(value) >= MIN_LEN:
            with self._lock:
                self._values = self._values | {value}

    def scrub(self, text: str) -> str:
        return scrub(text, self._values)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if not self._values:
            return event
        for key, value in list(event.items()):
            if isinstance(value, str):
                event[key] = self.scrub(value)
            elif isinstance(value, list | tuple | dict):
                event[key] = self.scrub(repr(value))
        return event
