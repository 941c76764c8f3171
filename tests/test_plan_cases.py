"""The planner, driven by data: one YAML file per scenario in ``plan_cases/``.

Each case gives the observed engine (containers described by how they were applied) and the
expected actions with their reasons. ``_base.yaml`` holds the desired stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.core import labels as L
from agent.core.observed import Observed, ObservedContainer
from agent.core.plan import Action, container_labels, container_name, desired_service, plan
from agent.core.stack import StackFile, StackSpec, parse_compose
from agent.core.yamlsrc import load

CASES = Path(__file__).parent / "plan_cases"
BASE = yaml.safe_load((CASES / "_base.yaml").read_text())


def _stack(compose: dict[str, Any], files: dict[str, str]) -> StackSpec:
    stack_files = {
        p: StackFile(path=p, content=c, mode=0o600 if p.endswith(".env") else 0o644, secret=p.endswith(".env"))
        for p, c in files.items()
    }
    return parse_compose(load(yaml.safe_dump(compose), "case"), "p", stack_files)


def _container(case_c: dict[str, Any], base: dict[str, Any], index: int) -> ObservedContainer:
    service = case_c.get("service")
    labels: dict[str, str] = {}
    if case_c.get("owned", True) and service is not None:
        applied = case_c.get("applied", {})
        compose = yaml.safe_load(yaml.safe_dump(base["compose"]))
        files = {**base["files"], **applied.get("files", {})}
        if service in compose["services"] and "environment" in applied:
            compose["services"][service]["environment"] = applied["environment"]
        if service not in compose["services"]:
            compose["services"][service] = {"image": "old:1"}
        stack = _stack(compose, files)
        image_id = applied.get("image_id", base["images"].get(stack.services[service].image))
        want = desired_service(stack, service, image_id)
        labels = container_labels(stack, want, host="h", commit="c0")
        name = case_c.get("name", container_name(stack, service))
    else:
        name = case_c["name"]
    labels.update(case_c.get("labels", {}))
    return ObservedContainer(
        id=f"id{index}",
        name=name,
        state=case_c.get("state", "running"),
        health=case_c.get("health"),
        image_id=case_c.get("applied", {}).get("image_id"),
        labels=labels,
        created=case_c.get("created", "2026-11-26T09:00:00Z"),
    )


def load_case(path: Path) -> tuple[list[Action], list[dict[str, Any]]]:
    case = yaml.safe_load(path.read_text())
    base = {**BASE, **case.get("desired", {})}
    stack = _stack(base["compose"], base["files"])
    obs = case["observed"]
    observed = Observed(
        containers=tuple(_container(c, base, i) for i, c in enumerate(obs.get("containers", []))),
        networks=tuple(obs.get("networks", [])),
        owned_networks=tuple(obs.get("owned_networks", [])),
        images=obs.get("images", base["images"]),
    )
    policy = case.get("on_config_change", base["on_config_change"])
    return plan(stack, observed, policy), case["expected"]


@pytest.mark.parametrize(
    "path", sorted(p for p in CASES.glob("*.yaml") if not p.name.startswith("_")), ids=lambda p: p.stem
)
def test_plan_case(path: Path) -> None:
    actions, expected = load_case(path)
    got = [(a.kind, a.target) for a in actions]
    assert got == [(e["action"], e["target"]) for e in expected], "\n".join(map(str, actions))
    for action, exp in zip(actions, expected, strict=True):
        assert exp.get("reason", "") in action.reason, str(action)
        if "reason_excludes" in exp:
            assert exp["reason_excludes"] not in action.reason
        if "changed" in exp:
            assert list(action.changed) == exp["changed"], str(action)
        if "signal" in exp:
            assert action.signal == exp["signal"]


def test_hash_ignores_order_of_unordered_lists() -> None:
    compose = {"services": {"a": {"image": "x:1", "ports": ["1000:1", "2000:2"], "volumes": ["/a:/a", "/b:/b"]}}}
    flipped = {"services": {"a": {"image": "x:1", "ports": ["2000:2", "1000:1"], "volumes": ["/b:/b", "/a:/a"]}}}
    one = desired_service(_stack(compose, {}), "a", "sha256:1")
    two = desired_service(_stack(flipped, {}), "a", "sha256:1")
    assert one.spec_hash == two.spec_hash
    reordered_cmd = {"services": {"a": {"image": "x:1", "command": ["b", "a"]}}}
    cmd = {"services": {"a": {"image": "x:1", "command": ["a", "b"]}}}
    assert (
        desired_service(_stack(cmd, {}), "a", "i").spec_hash
        != desired_service(_stack(reordered_cmd, {}), "a", "i").spec_hash
    )


def test_labels_carry_the_compose_set() -> None:
    stack = _stack(BASE["compose"], BASE["files"])
    labels = container_labels(stack, desired_service(stack, "litellm", "sha256:lite1"), "motoko", "abc")
    assert labels[L.ONEOFF] == "False"
    assert labels[L.PROJECT] == "p" and labels[L.SERVICE] == "litellm"
    assert labels[L.OWNER] == L.OWNER_VALUE and labels[L.COMMIT] == "abc"
    assert "k1" not in "".join(labels.values())  # no secret value in any label
