"""The node report schema and ``accept``: who may report, when, and in which order."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from agent.core.health import Stage
from agent.core.report import Accepted, LastSeen, NodeReport, Rejected, Rejection, accept

NOW = 1_800_000_000.0
BOOT_A = "a" * 16
BOOT_B = "b" * 16


def report_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "host": "gpu-1",
        "role": "gpu_node",
        "commit": "0123abc",
        "stage": "ready",
        "health": {"checks": [{"name": "health", "ok": True}], "load": {"running": 1, "waiting": 0}},
        "gpu": {"status": "ok", "gpus": [{"index": 0, "name": "NVIDIA H200"}]},
        "services": {"vllm": "running"},
        "boot_id": BOOT_A,
        "seq": 1,
        "sent_at": NOW,
        "agent_version": "0.1.0",
    }
    data.update(changes)
    return data


def report(**changes: Any) -> NodeReport:
    return NodeReport.model_validate_json(json.dumps(report_data(**changes)))


def test_a_report_parses_from_json_with_its_nested_health_and_gpu() -> None:
    r = report()
    assert r.stage is Stage.READY and r.health is not None and r.health.load.running == 1
    assert r.gpu is not None and r.gpu.gpus[0].name == "NVIDIA H200"


@pytest.mark.parametrize(
    "changes",
    [
        {"seq": "1"},  # strict: no coercion
        {"sent_at": "1800000000"},
        {"stage": "sleeping"},
        {"host": "GPU_1"},
        {"boot_id": "short"},
        {"seq": -1},
        {"commit": "not a sha"},
        {"extra": 1},
        {"health": {"checks": [], "surprise": True}},
        {"problem": "x" * 501},  # a problem is one line for the fleet view, not a log
        {"problem": ""},
        {"problem": 7},
    ],
    ids=[
        "seq-str",
        "sent_at-str",
        "stage",
        "host",
        "boot_id",
        "seq-negative",
        "commit",
        "extra",
        "nested-extra",
        "problem-long",
        "problem-empty",
        "problem-int",
    ],
)
def test_a_malformed_report_is_refused_by_the_schema(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        report(**changes)


def test_nan_and_infinite_timestamps_are_refused_by_the_schema() -> None:
    for raw in ("NaN", "Infinity", "-Infinity"):
        text = json.dumps(report_data()).replace(f'"sent_at": {NOW}', f'"sent_at": {raw}')
        with pytest.raises(ValidationError):
            NodeReport.model_validate_json(text)


def test_the_first_report_of_a_host_is_accepted() -> None:
    assert accept(report(), "gpu-1", NOW, None) == Accepted(new_boot=True)


def test_a_host_may_report_only_for_itself() -> None:
    verdict = accept(report(host="gpu-2"), "gpu-1", NOW, None)
    assert isinstance(verdict, Rejected) and verdict.reason is Rejection.WRONG_HOST
    assert "only for itself" in verdict.detail


@pytest.mark.parametrize(
    ("offset", "reason"), [(-61.0, Rejection.STALE), (61.0, Rejection.FUTURE), (-3600.0, Rejection.STALE)]
)
def test_a_report_outside_the_window_is_refused(offset: float, reason: Rejection) -> None:
    verdict = accept(report(sent_at=NOW + offset), "gpu-1", NOW, None)
    assert isinstance(verdict, Rejected) and verdict.reason is reason
    assert "stale or from the future" in verdict.detail


def test_the_window_edges_are_inside_and_the_window_is_a_parameter() -> None:
    assert isinstance(accept(report(sent_at=NOW - 60), "gpu-1", NOW, None), Accepted)
    assert isinstance(accept(report(sent_at=NOW + 60), "gpu-1", NOW, None), Accepted)
    assert isinstance(accept(report(sent_at=NOW - 10), "gpu-1", NOW, None, window_s=5), Rejected)


def test_a_replayed_or_older_seq_of_the_same_run_is_refused() -> None:
    last = LastSeen(BOOT_A, seq=5, sent_at=NOW - 1)
    for seq in (5, 4, 0):
        verdict = accept(report(seq=seq), "gpu-1", NOW, last)
        assert isinstance(verdict, Rejected) and verdict.reason is Rejection.REPLAY, seq
    assert accept(report(seq=6), "gpu-1", NOW, last) == Accepted(new_boot=False)


def test_a_restarted_agent_starts_its_seq_over_with_a_new_boot_id() -> None:
    last = LastSeen(BOOT_A, seq=500, sent_at=NOW - 5)
    assert accept(report(boot_id=BOOT_B, seq=0), "gpu-1", NOW, last) == Accepted(new_boot=True)


def test_a_report_of_an_earlier_run_replayed_after_a_restart_is_refused() -> None:
    # Run A sent seq 9 at NOW-20; the agent restarted as run B and was accepted at NOW-10.
    last = LastSeen(BOOT_B, seq=0, sent_at=NOW - 10)
    verdict = accept(report(boot_id=BOOT_A, seq=9, sent_at=NOW - 20), "gpu-1", NOW, last)
    assert isinstance(verdict, Rejected) and verdict.reason is Rejection.REPLAY
