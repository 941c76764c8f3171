"""Drift does not wait for the interval: the daemon watches the engine's events for its own
containers and runs a pass at once. Through the fakes: a removed container is back long
before the (60 s) interval; a pass's own replacements cost at most one extra pass and the
daemon goes quiet; a broken stream is reopened; bursts are debounced; stop ends it all."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests.exceptions

from agent.adapters.engine import DockerEvents
from agent.core import labels as L
from agent.core.errors import EngineUnavailable
from agent.core.ports import EngineEvent
from agent.daemon.watch import EventWatcher, Timing
from agent.testing.fakes import FakeEngine
from tests.test_daemon_fake import A, B, Fleet, host_edit

# A running scheduler and watcher thread, real debounce and backoff waits: ~2 s, run in CI.
pytestmark = pytest.mark.slow


def until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.01)
    return check()


@pytest.fixture
def live(tmp_path: Path, repo: Path) -> Iterator[Fleet]:
    """A daemon with its scheduler and event watcher running (interval 60 s: only an event
    can explain a pass within the test)."""
    fleet = Fleet(tmp_path, repo)
    fleet.settings = fleet.settings.model_copy(update={"interval": 60.0, "splay": 0.0})
    fleet.daemon.settings = fleet.settings
    fleet.daemon.event_debounce_s = 0.05
    fleet.daemon.event_backoff_s = (0.01, 0.05)
    fleet.push(A)
    fleet.daemon._schedule()  # the first pass runs at once
    watcher = fleet.daemon.start_watching()
    try:
        assert until(lambda: len(fleet.daemon.store.load().runs) == 1), "first pass"
        assert until(lambda: watcher.connections >= 1)
        yield fleet
    finally:
        watcher.close()
        fleet.daemon.scheduler.shutdown(wait=True)
    assert watcher._thread is not None and not watcher._thread.is_alive(), "the watcher stops"


def runs(fleet: Fleet) -> int:
    return len(fleet.daemon.store.load().runs)


def quiet(fleet: Fleet, for_s: float = 0.25) -> int:
    """The number of passes once no more come for ``for_s``."""
    before = -1
    while runs(fleet) != before:
        before = runs(fleet)
        time.sleep(for_s)
    return before


def running_vllm(fleet: Fleet) -> bool:
    return [c.state for c in fleet.vllm()] == ["running"]


def test_a_removed_container_is_back_at_once(live: Fleet) -> None:
    [old] = live.vllm()
    live.engine.remove(old.id)  # docker rm -f: kill, die, destroy
    assert until(lambda: running_vllm(live), 5.0), "back through the event, not the 60 s interval"
    assert quiet(live) == 2, "one pass healed it; its create caused no event"


def test_a_pass_s_own_replacement_costs_at_most_one_extra_pass(live: Fleet) -> None:
    [old] = live.vllm()
    live.push(B, host_edit("  vllm_image: vllm/other:2\n"))
    live.daemon.trigger()
    assert until(lambda: running_vllm(live) and live.vllm()[0].id != old.id)
    total = quiet(live)
    assert total == 3, "the replacement's own events: exactly one more pass"
    last = live.daemon.store.load().runs[-1]
    assert last.result == "converged" and last.actions == [], "the extra pass found nothing to do"


def test_a_broken_stream_is_reopened(live: Fleet) -> None:
    watcher_connections = len(live.engine.ops("events"))
    live.engine.break_streams()
    assert until(lambda: len(live.engine.ops("events")) > watcher_connections)
    [old] = live.vllm()
    live.engine.remove(old.id)
    assert until(lambda: running_vllm(live), 5.0)


def test_an_unavailable_engine_is_retried_with_backoff() -> None:
    engine = FakeEngine()
    engine.unavailable = True
    stop = threading.Event()
    timing = Timing(backoff_s=(0.01, 0.04))
    watcher = EventWatcher(lambda: engine, "p", lambda: None, stop, timing=timing).start()
    assert until(lambda: len(engine.ops("events")) >= 3), "keeps trying"
    engine.unavailable = False
    assert until(lambda: watcher.connections == 1)
    watcher.close()
    assert watcher._thread is not None and not watcher._thread.is_alive()


def test_a_burst_is_one_pass_and_events_during_a_pass_only_ask_for_one_more() -> None:
    engine = FakeEngine()
    owned = {L.PROJECT: "p", L.OWNER: L.OWNER_VALUE}
    cids = [engine.add(f"c{i}", owned) for i in range(5)]
    foreign = engine.add("theirs", {L.PROJECT: "p"})
    fired: list[float] = []
    busy = threading.Event()
    stop = threading.Event()
    watcher = EventWatcher(
        lambda: engine, "p", lambda: fired.append(time.monotonic()), stop, busy=busy.is_set, timing=Timing(0.1)
    ).start()
    assert until(lambda: watcher.connections == 1)
    engine.emit(foreign, "die")  # not ours: filtered out
    for cid in cids:
        engine.emit(cid, "kill", "die")
    assert until(lambda: len(fired) == 1)
    time.sleep(0.3)
    assert len(fired) == 1, "ten events in a burst: one request"
    busy.set()
    watcher.debounce_s = 30.0  # only the immediate path can answer in time now
    engine.emit(cids[0], "die")
    assert until(lambda: len(fired) == 2, 2.0), "during a pass: asked at once (the daemon coalesces)"
    watcher.close()


class Broken:
    """A docker events stream whose socket breaks after one event."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield {"Type": "container", "Action": "die", "Actor": {"ID": "abc", "Attributes": {"name": "x"}}, "time": 5}
        yield {"Type": "container", "Action": "health_status: healthy", "Actor": {"ID": "abc"}}
        raise self.error

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    "error", [requests.exceptions.ConnectionError("reset"), OSError("gone"), ValueError("bad json")]
)
def test_the_docker_stream_maps_every_failure(error: Exception) -> None:
    stream = DockerEvents(Broken(error))
    got: list[EngineEvent] = []
    with pytest.raises(EngineUnavailable):
        got.extend(stream)
    assert got == [EngineEvent("die", "abc", "x", 5.0)], "only the watched events"
    closed = DockerEvents(Broken(error))
    closed.close()
    assert list(closed) == [EngineEvent("die", "abc", "x", 5.0)], "closed: ends quietly"
