"""The event watcher against the real engine: a container removed by hand (``docker rm -f``)
under a running ``agent run`` is back in seconds, with an interval of 60 s so that only the
engine's event can explain it."""

from __future__ import annotations

import time

import pytest

from tests.dockerkit import docker
from tests.test_daemon import Rig, applied
from tests.test_daemon import rig as rig  # noqa: F401  (the fixture)

pytestmark = pytest.mark.docker


def running(rig: Rig) -> list[str]:
    project = f"{rig.prefix}armitage"
    out = docker("ps", "--filter", f"label=com.docker.compose.project={project}", "--format", "{{.ID}}")
    return out.splitlines()


def test_a_container_removed_by_hand_is_back_through_the_event(rig: Rig) -> None:
    rig.env.update(AGENT_INTERVAL="60", AGENT_SPLAY="0")
    first = rig.commit("armitage on the fake vLLM", edit=rig.set_armitage())
    rig.start()
    rig.wait(applied(first), 20, "first commit applied")
    [old] = running(rig)
    time.sleep(1.0)  # the watcher has its stream open (it opens at start, well before this)

    t0 = time.monotonic()
    docker("rm", "-f", old)
    while time.monotonic() - t0 < 10 and not [c for c in running(rig) if not old.startswith(c)]:
        time.sleep(0.05)
    back = time.monotonic() - t0
    new = running(rig)
    assert new and not old.startswith(new[0]), f"not back within 10 s (interval 60 s)\n{rig.log()[-3000:]}"
    print(f"docker rm -f to running again: {back:.2f}s")
    assert back < 10
    assert "container event" in rig.log()
