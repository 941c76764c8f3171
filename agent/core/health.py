"""Node health, judged from what the probes saw: pure.

A gpu_node's backend is *ready* only when vLLM's ``/health`` answers, ``/v1/models`` lists the
name the gateway will call, and a one-token canary completion streams its first token within
the probe timeout (so a backend that hangs, or stalls after its headers, is not ready). The
stage says where a backend is on its way up or down; the load comes from vLLM's own gauges.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class Stage(StrEnum):
    PULLING = "pulling"
    STARTING = "starting"
    LOADING = "loading"  # vLLM is loading the model (from its log)
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    UNKNOWN = "unknown"


#: Lines vLLM logs while it loads a model (weights, safetensors shards, CUDA graphs).
LOADING_MARKERS = (
    "Starting to load model",
    "Loading model weights",
    "Loading safetensors checkpoint shards",
    "Loading weights took",
    "Memory profiling takes",
    "Capturing cudagraphs",
    "Capturing CUDA graph",
    "init engine",
)


class Check(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # health | models | canary | metrics
    ok: bool
    detail: str = ""
    ms: float | None = None


class Load(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    running: float | None = None
    waiting: float | None = None

    @property
    def idle(self) -> bool:
        """No request running or waiting (unknown counts as not idle)."""
        return self.running == 0 and self.waiting == 0


class BackendHealth(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    checks: tuple[Check, ...] = ()
    load: Load = Load()

    @classmethod
    def failed(cls, why: str) -> BackendHealth:
        """A probe that could not run at all (counted as a failed probe)."""
        return cls(checks=(Check(name="health", ok=False, detail=why),))

    @property
    def ready(self) -> bool:
        required = {c.name: c.ok for c in self.checks if c.name in ("health", "models", "canary")}
        return len(required) == 3 and all(required.values())

    @property
    def reason(self) -> str:
        failed = [f"{c.name}: {c.detail}" for c in self.checks if not c.ok and c.name != "metrics"]
        return "; ".join(failed) if failed else ("ready" if self.ready else "not probed")


_GAUGE = re.compile(r"^(vllm:num_requests_(?:running|waiting))(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN)\s*$", re.M)


def parse_vllm_load(text: str) -> Load:
    """vLLM's ``/metrics`` (Prometheus text): requests running and waiting, summed over models."""
    sums: dict[str, float] = {}
    for name, value in _GAUGE.findall(text):
        try:
            number = float(value)
        except ValueError:
            continue
        if not math.isnan(number):
            sums[name] = sums.get(name, 0.0) + number
    return Load(running=sums.get("vllm:num_requests_running"), waiting=sums.get("vllm:num_requests_waiting"))


def stage_of(
    container_state: str | None,
    log_tail: str,
    probe: BackendHealth | None,
    *,
    pulling: bool = False,
    draining: bool = False,
) -> Stage:
    """Where the backend is, from the container, its last log lines and the probe."""
    ordered: list[tuple[bool, Stage]] = [
        (draining, Stage.DRAINING),
        (pulling, Stage.PULLING),
        (container_state in (None, "created"), Stage.STARTING),
        (container_state in ("exited", "dead", "restarting"), Stage.FAILED),
        (probe is not None and probe.ready, Stage.READY),
        (any(marker in log_tail for marker in LOADING_MARKERS), Stage.LOADING),
    ]
    return next((stage for holds, stage in ordered if holds), Stage.STARTING)
