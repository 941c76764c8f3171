"""The executor's safety rules, against a fake engine (a fake of our own seam, ``Engine``):
rollbacks bring the old container back on the old files, a shutdown is not a failed rollout,
a write failing half-way is undone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.adapters.engine import EngineError
from agent.core.observed import Observed, ObservedContainer
from agent.core.plan import container_labels, desired_service, plan
from agent.core.stack import StackFile, StackSpec, parse_compose
from agent.core.yamlsrc import load
from agent.node.executor import Executor


class FakeEngine:
    """Containers as dicts; ``healthy`` decides what wait_healthy says for new ones."""

    def __init__(self, healthy: bool = True, fail_on: str | None = None) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.healthy = healthy
        self.fail_on = fail_on
        self.calls: list[str] = []
        self.n = 0

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_on:
            self.fail_on = None  # fails once
            raise EngineError(f"{name}: boom")

    def add(self, name: str, labels: dict[str, str]) -> str:
        self.n += 1
        cid = f"c{self.n}"
        self.containers[cid] = {"name": name, "state": "running", "labels": labels}
        return cid

    def image_id(self, ref: str) -> str:
        return "sha256:img"

    def pull(self, ref: str) -> str:
        return "sha256:img"

    def ensure_network(self, *a: Any) -> None: ...
    def ensure_volume(self, *a: Any) -> None: ...
    def remove_network(self, *a: Any) -> None: ...

    def create(self, stack: StackSpec, spec: Any, name: str, labels: dict[str, str], stack_dir: str) -> str:
        self._call("create")
        cid = self.add(name, labels)
        self.containers[cid]["state"] = "created"
        return cid

    def start(self, cid: str) -> None:
        self._call("start")
        self.containers[cid]["state"] = "running"

    def stop(self, cid: str, timeout: int | None = None) -> None:
        self._call("stop")
        self.containers[cid]["state"] = "exited"

    def restart(self, cid: str, timeout: int | None = None) -> None:
        self._call("restart")

    def rename(self, cid: str, name: str) -> None:
        self._call("rename")
        self.containers[cid]["name"] = name

    def remove(self, cid: str, grace_s: int | None = None, graceful: bool = False) -> None:
        self._call("remove")
        self.containers.pop(cid, None)

    def signal(self, cid: str, sig: str) -> None: ...

    def state(self, cid: str) -> tuple[str, str | None, int]:
        return self.containers[cid]["state"], None, 0

    def wait_healthy(self, cid: str, deadline_s: float, has_hc: bool, stopping: Any = lambda: False) -> str | None:
        if stopping():
            return "the agent is stopping: rollout abandoned"
        return None if self.healthy else "healthcheck reports unhealthy"

    def by_name(self) -> dict[str, str]:
        return {c["name"]: c["state"] for c in self.containers.values()}


COMPOSE = {
    "services": {
        "web": {"image": "web:1", "ports": ["8080:80"], "volumes": ["./conf:/conf:ro"], "environment": {"V": "1"}}
    }
}


def stack_of(v: str, conf: str) -> StackSpec:
    doc = yaml.safe_load(yaml.safe_dump(COMPOSE))
    doc["services"]["web"]["environment"]["V"] = v
    files = {"conf/app.conf": StackFile(path="conf/app.conf", content=conf)}
    return parse_compose(load(yaml.safe_dump(doc), "t"), "p", files)


def running_old(engine: FakeEngine, tmp_path: Path) -> StackSpec:
    old = stack_of("1", "old\n")
    engine.add("p-web-1", container_labels(old, desired_service(old, "web", "sha256:img"), "h", "c0"))
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.conf").write_text("old\n")
    return old


def observed(engine: FakeEngine) -> Observed:
    return Observed(
        containers=tuple(
            ObservedContainer(id=cid, name=c["name"], state=c["state"], labels=c["labels"])
            for cid, c in engine.containers.items()
        ),
        networks=("p_default",),
        images={"web:1": "sha256:img"},
    )


def apply(engine: FakeEngine, tmp_path: Path, stopping: bool = False) -> Any:
    new = stack_of("2", "new\n")
    actions = plan(new, observed(engine))
    assert [a.kind for a in actions] == ["recreate"]
    return Executor(engine, tmp_path, "h", "c1", stopping=lambda: stopping).apply(new, actions)  # type: ignore[arg-type]


def test_a_new_version_that_fails_brings_back_the_old_one_on_the_old_files(tmp_path: Path) -> None:
    engine = FakeEngine(healthy=False)
    running_old(engine, tmp_path)
    result = apply(engine, tmp_path)
    assert not result.ok and result.rolled_back and result.rollout_failed
    assert engine.by_name() == {"p-web-1": "running"}
    assert (tmp_path / "conf" / "app.conf").read_text() == "old\n"


def test_a_shutdown_mid_rollout_rolls_back_but_is_not_a_failed_rollout(tmp_path: Path) -> None:
    engine = FakeEngine()
    running_old(engine, tmp_path)
    result = apply(engine, tmp_path, stopping=True)
    assert not result.ok and result.rolled_back and not result.rollout_failed  # not quarantined
    assert engine.by_name() == {"p-web-1": "running"}


@pytest.mark.parametrize("step", ["start", "rename"])
def test_an_engine_error_mid_replacement_still_brings_the_old_one_back(tmp_path: Path, step: str) -> None:
    engine = FakeEngine(fail_on=step)
    running_old(engine, tmp_path)
    result = apply(engine, tmp_path)
    assert not result.ok and result.rolled_back
    assert f"{step}: boom" in (result.error or "") and "old container restarted" in (result.error or "")
    assert engine.by_name() == {"p-web-1": "running"}  # the new one is gone, the old one serves
    assert (tmp_path / "conf" / "app.conf").read_text() == "old\n"


def test_an_incomplete_rollback_says_so(tmp_path: Path) -> None:
    engine = FakeEngine(healthy=False)
    running_old(engine, tmp_path)
    real_start = engine.start

    def start(cid: str) -> None:
        if engine.containers[cid]["labels"].get("io.llm-agent.commit") == "c0":
            raise EngineError("start: the old one will not start")
        real_start(cid)

    engine.start = start  # type: ignore[method-assign]
    result = apply(engine, tmp_path)
    assert "ROLLBACK INCOMPLETE, the old container may be down" in (result.error or "")


def test_a_write_failing_half_way_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine()
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
    result = Executor(engine, tmp_path, "h", "c1").apply(new, plan(new, observed(engine)))  # type: ignore[arg-type]
    assert not result.ok and "No space left on device" in (result.error or "")
    assert (tmp_path / "conf" / "app.conf").read_text() == "old\n"
    assert not (tmp_path / "conf" / "z.conf").exists()
    assert engine.by_name() == {"p-web-1": "running"}
