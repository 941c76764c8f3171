"""A real fleet API (``agent.fleet.api.FleetApi``) on 127.0.0.1 for tests, stopped afterwards."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.fleet.api import FleetApi


@contextmanager
def fleet_api(
    db: Path, tokens: Mapping[str, str], clock: Callable[[], float] | None = None, port: int = 0
) -> Iterator[FleetApi]:
    """Serves on ``port`` (0: a free one); polls for shutdown fast, since tests close often."""
    kwargs: dict[str, Any] = {"address": ("127.0.0.1", port)}
    if clock is not None:
        kwargs["clock"] = clock
    api = FleetApi(db, dict(tokens), **kwargs)
    api.thread = threading.Thread(target=api.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    api.start()
    try:
        yield api
    finally:
        api.close()
