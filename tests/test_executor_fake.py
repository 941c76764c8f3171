"""The executor's safety rules, against the public fake engine (``agent.testing``): rollbacks
bring the old container back on the old files, a shutdown is not a failed rollout, a write
failing half-way is undone, the old container stays until the new one is healthy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.core.errors import EngineError
from agent.core.outcomes import Failure
from agent.core.plan import container_labels, desired_service, plan
from agent.core.stack import StackFile, StackSpec, parse_compose
from agent.core.yamlsrc import load
from agent.node.executor import ApplyResult, Executor, Rollout
from agent.testing.fakes import FakeClock, FakeContainer, FakeEngine

IMG = {"web:1": "sha256:img"}


def compose(ports: bool = True, healthcheck: bool = False) -> dict[str, Any]:
    web: dict[str, Any] = {"image": "web:1", "volumes": ["./conf:/conf:ro"], "environment": {"V": "1"}}
    if ports:
        web["ports"] = ["8080:80"]
    if healthcheck:
        web["healthcheck"] = {"test": ["CMD", "true"], "interval": "1s", "retries": 2}
    return {"services": {"web": web}}


def stack_of(v: str, conf: str, **kw: bool) -> StackSpec:
    doc = compose(**kw)
    doc["services"]["web"]["environment"]["V"] = v
    files = {"conf/app.conf": StackFile(path="conf/app.conf", content=conf)}
    return parse_compose(load(yaml.safe_dump(doc), "t"), "p", files)


def running_old(engine: FakeEngine, tmp_path: Path, **kw: bool) -> str:
    old = stack_of("1", "old\n", **kw)
    cid = engine.add("p-web-1", container_labels(old, desired_service(old, "web", "sha256:img"), "h", "c0"), "web:1")
    engine.ensure_network("p_default", "p", "default", "bridge")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.conf").write_text("old\n")
    return cid


def apply(engine: FakeEngine, tmp_path: Path, stopping: bool = False, **kw: bool) -> ApplyResult:
    new = stack_of("2", "new\n", **kw)
    actions = plan(new, engine.observe("p", ["web:1"]))
    assert [a.kind for a in actions] == ["recreate"]
    rollout = Rollout("h", "c1", stopping=lambda: stopping)
    return Executor(engine, tmp_path, rollout, FakeClock()).apply(new, actions)


def test_a_new_version_that_fails_brings_back_the_old_one_on_the_old_files(tmp_path: Path) -> None:
    engine = FakeEngine(IMG, behaviour=lambda c: "unhealthy")
    old = running_old(engine, tmp_path, healthcheck=True)
    seen: list[str] = []  # what the old container finds mounted when it starts again
    engine.on("start", lambda cid: seen.append((tmp_path / "conf" / "app.conf").read_text()) if cid == old else None)
    result = apply(engine, tmp_path, healthcheck=True)
    assert seen == ["old\n"], "the old container must restart on the old files, not the new ones"
    assert not result.ok and result.rolled_back and result.rollout_failed
    assert result.failure is Failure.ROLLOUT
    assert engine.by_name() == {"p-web-1": "running"}
    assert (tmp_path / "conf" / "app.conf").read_text() == "old\n"


def test_a_shutdown_mid_rollout_rolls_back_but_is_not_a_failed_rollout(tmp_path: Path) -> None:
    engine = FakeEngine(IMG)
    running_old(engine, tmp_path)
    result = apply(engine, tmp_path, stopping=True)
    assert not result.ok and result.rolled_back and not result.rollout_failed  # not quarantined
    assert result.failure is Failure.STOPPED
    assert engine.by_name() == {"p-web-1": "running"}


@pytest.mark.parametrize("step", ["start", "rename"])
def test_an_engine_error_mid_replacement_still_brings_the_old_one_back(tmp_path: Path, step: str) -> None:
    engine = FakeEngine(IMG)
    running_old(engine, tmp_path)
    engine.fail_next(step)
    result = apply(engine, tmp_path)
    assert not result.ok and result.rolled_back
    assert f"{step}: boom" in (result.error or "") and "old container restarted" in (result.error or "")
    assert engine.by_name() == {"p-web-1": "running"}  # the new one is gone, the old one serves
    assert (tmp_path / "conf" / "app.conf").read_text() == "old\n"


def test_an_incomplete_rollback_says_so(tmp_path: Path) -> None:
    engine = FakeEngine(IMG, behaviour=lambda c: "unhealthy")
    old = running_old(engine, tmp_path, healthcheck=True)

    def start(cid: str) -> None:
        if cid == old:
            raise EngineError("start: the old one will not start")

    engine.on("start", start)
    result = apply(engine, tmp_path, healthcheck=True)
    assert "ROLLBACK INCOMPLETE, the old container may be down" in (result.error or "")


def test_a_write_failing_half_way_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine(IMG)
    running_old(engine, tmp_path)
    new = stack_of("1", "new\n")
    new = new.model_copy(update={"files": {**new.files, "conf/z.conf": StackFile(path="conf/z.conf", content="z\n")}})
    import agent.node.executor as ex
    from agent.adapters.fs import write_atomic as real

    calls = {"n": 0}

    def flaky(path: Path, data: bytes, mode: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(path, data, mode)

    monkeypatch.setattr(ex, "write_atomic", flaky)
    actions = plan(new, engine.observe("p", ["web:1"]))
    result = Executor(engine, tmp_path, Rollout("h", "c1"), FakeClock()).apply(new, actions)
    assert not result.ok and "No space left on device" in (result.error or "")
    assert (tmp_path / "conf" / "app.conf").read_text() == "old\n"
    assert not (tmp_path / "conf" / "z.conf").exists()
    assert engine.by_name() == {"p-web-1": "running"}


def test_without_ports_the_old_container_serves_until_the_new_one_is_healthy(tmp_path: Path) -> None:
    """No host port in the way: the old one must not be stopped or removed before the new one
    passed its healthcheck; a new one that never does leaves the old one untouched."""
    engine = FakeEngine(IMG, behaviour=lambda c: "starting")  # never becomes healthy
    old = running_old(engine, tmp_path, ports=False, healthcheck=True)
    result = apply(engine, tmp_path, ports=False, healthcheck=True)
    assert not result.ok and result.rollout_failed
    assert old not in engine.ops("stop") and old not in engine.ops("remove")
    assert engine.by_name() == {"p-web-1": "running"}


def test_without_ports_the_old_one_goes_only_after_the_new_one_was_seen_healthy(tmp_path: Path) -> None:
    engine = FakeEngine(IMG)
    old = running_old(engine, tmp_path, ports=False, healthcheck=True)
    result = apply(engine, tmp_path, ports=False, healthcheck=True)
    assert result.ok, result.error
    new = next(c.id for c in engine.containers.values() if c.id != old)
    healthy_seen = engine.calls.index(("state", new))
    assert engine.calls.index(("remove", old)) > healthy_seen
    assert engine.by_name() == {"p-web-1": "running"}


def loading(c: FakeContainer) -> str:
    c.logs = "INFO loading model weights 40%"
    return "starting"


def test_a_slow_start_is_reported_while_waiting_with_the_last_log_line(tmp_path: Path) -> None:
    engine = FakeEngine(IMG, behaviour=loading)
    running_old(engine, tmp_path, healthcheck=True)
    said: list[str] = []
    new = stack_of("2", "new\n", healthcheck=True)
    actions = plan(new, engine.observe("p", ["web:1"]))
    clock = FakeClock()
    Executor(engine, tmp_path, Rollout("h", "c1", health_cap_s=60, say=said.append), clock).apply(new, actions)
    notes = [s for s in said if "waiting to be healthy" in s]
    assert len(notes) >= 3, said  # about one every 15 s of a 60 s wait
    assert "last log line: INFO loading model weights 40%" in notes[0]
    assert clock.slept >= 60


def reload_stack(conf: str) -> StackSpec:
    doc = compose(ports=True, healthcheck=True)
    files = {"conf/app.conf": StackFile(path="conf/app.conf", content=conf)}
    return parse_compose(load(yaml.safe_dump(doc), "t"), "p", files)


@pytest.mark.parametrize("checked", [False, True])
def test_a_rolling_reload_checked_by_the_pass_is_not_undone_by_a_failing_healthcheck(
    tmp_path: Path, checked: bool
) -> None:
    """The gateway's SIGTTIN reload: an old worker finishing long streams answers its readiness
    503 (the container's healthcheck fails) while the new worker serves. That is checked by the
    pass (serving); a restart there would be an outage."""
    engine = FakeEngine(IMG)
    old = reload_stack("old\n")
    cid = engine.add("p-web-1", container_labels(old, desired_service(old, "web", "sha256:img"), "h", "c0"), "web:1")
    engine.containers[cid].has_healthcheck = True
    engine.containers[cid].health = "unhealthy"
    engine.ensure_network("p_default", "p", "default", "bridge")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.conf").write_text("old\n")
    new = reload_stack("new\n")
    actions = plan(new, engine.observe("p", ["web:1"]), {"web": "signal:SIGTTIN"})
    assert [a.kind for a in actions] == ["reload"]
    rollout = Rollout("h", "c1", checked_signals=frozenset({"SIGTTIN"}) if checked else frozenset())
    result = Executor(engine, tmp_path, rollout, FakeClock()).apply(new, actions)
    restarts = [op for op in engine.calls if op[0] == "restart"]
    if checked:
        assert result.ok, result.error
        assert restarts == [] and (tmp_path / "conf" / "app.conf").read_text() == "new\n"
    else:  # any other reload: no passing healthcheck, the old files back and a restart
        assert not result.ok and restarts and (tmp_path / "conf" / "app.conf").read_text() == "old\n"
