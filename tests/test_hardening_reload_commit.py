"""A reload-only change cannot relabel the live container: the commit it now runs is recorded
with its files, and what the agent observes (and status shows) is the effective commit."""

from __future__ import annotations

from pathlib import Path

from agent.core import labels as L
from agent.core.plan import container_labels, desired_service, plan
from agent.node.executor import Executor, Rollout, with_reloads
from agent.node.reconcile import _services
from agent.testing.fakes import FakeClock, FakeEngine
from tests.test_regressions import _proxy


def test_a_reload_records_the_commit_the_container_now_runs(tmp_path: Path) -> None:
    engine = FakeEngine({"proxy:1": "sha256:p"})
    old = _proxy("routing: old\n")
    cid = engine.add(
        "p-proxy-1", container_labels(old, desired_service(old, "proxy", "sha256:p"), "h", "c0"), "proxy:1"
    )
    engine.containers[cid].health = "healthy"
    engine.ensure_network("p_default", "p", "default", "bridge")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.yaml").write_text("routing: old\n")
    new = _proxy("routing: new\n")
    actions = plan(new, engine.observe("p", ["proxy:1"]), {"proxy": "signal:SIGHUP"})
    assert [a.kind for a in actions] == ["reload"]
    result = Executor(engine, tmp_path, Rollout("h", "c1"), FakeClock()).apply(new, actions)
    assert result.ok, result.error
    assert engine.containers[cid].labels[L.COMMIT] == "c0"  # the live label cannot change

    observed = with_reloads(engine.observe("p", ["proxy:1"]), tmp_path)
    (seen,) = observed.containers
    assert seen.labels[L.COMMIT] == "c1"
    assert _services(new, observed)["proxy"]["commit"] == "c1"
