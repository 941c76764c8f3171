"""GPU health, judged from readings: pure. The NVML adapter (``agent.adapters.nvml``) reads;
this decides what the readings mean for a vLLM host.

A reading that NVML could not make (``None``: unsupported in a VM, no permission) is never
taken as bad news; a host without NVML at all is ``unknown``, not failed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GpuStatus = Literal["ok", "degraded", "failed", "unknown"]

#: Xid errors after which the GPU (or its memory) cannot be trusted until a reset or reboot
#: (NVIDIA's Xid catalogue: 48 double-bit ECC, 63/64 row remapping, 74 NVLink, 79 fallen off
#: the bus, 92 high single-bit ECC rate, 94/95 contained/uncontained ECC, 119/120 GSP).
CRITICAL_XIDS = frozenset({48, 63, 64, 74, 79, 92, 94, 95, 119, 120})
HOT_C = 87  # above this a data-centre GPU throttles hard


class GpuReading(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    name: str = ""
    uuid: str = ""
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    utilization_pct: int | None = None
    ecc_uncorrected: int | None = None
    #: a row remap failed: the memory has errors that cannot be remapped any more
    remap_failure: bool | None = None
    retired_pages_pending: bool | None = None
    #: the last critical Xid seen, if any
    xid: int | None = None
    processes: int | None = None


class GpuFacts(BaseModel):
    """What a node reports about its GPUs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: GpuStatus
    reason: str = ""
    driver_version: str | None = None
    requested: int | None = None
    visible: int | None = None
    gpus: tuple[GpuReading, ...] = ()
    problems: tuple[str, ...] = Field(default_factory=tuple)

    def summary(self) -> str:
        """One line for ``agent status``: ``1x NVIDIA H200, 0.6/140.4 GiB, 34 C``."""
        if self.status == "unknown" or not self.gpus:
            return f"unknown ({self.reason})" if self.reason else "unknown"
        first = self.gpus[0]
        used = sum(g.memory_used_bytes or 0 for g in self.gpus) / 2**30
        total = sum(g.memory_total_bytes or 0 for g in self.gpus) / 2**30
        temp = max((g.temperature_c for g in self.gpus if g.temperature_c is not None), default=None)
        text = f"{len(self.gpus)}x {first.name}, {used:.1f}/{total:.1f} GiB" + (f", {temp} C" if temp else "")
        return text if self.status == "ok" else f"{self.status.upper()}: {text}; {'; '.join(self.problems)}"


def assess(
    readings: list[GpuReading] | None,
    requested: int | Literal["all"] | None,
    why_unknown: str = "",
    driver_version: str | None = None,
) -> GpuFacts:
    """Judge the readings against what the host's vLLM asks for (``gpu_count``)."""
    want = None if requested == "all" else requested
    if readings is None:
        if want == 0:
            return GpuFacts(status="ok", reason="no GPU requested", requested=0)
        return GpuFacts(status="unknown", reason=why_unknown or "NVML not available", requested=want)
    failed = [p for r in readings for p in _failures(r)]
    if want is not None and len(readings) < want:
        failed.insert(0, f"{want} GPU(s) requested, {len(readings)} visible")
    if requested == "all" and not readings:
        failed.insert(0, "all GPUs requested, none visible")
    degraded = [p for r in readings for p in _warnings(r)]
    status: GpuStatus = "failed" if failed else "degraded" if degraded else "ok"
    return GpuFacts(
        status=status,
        reason=(failed or degraded or [""])[0],
        driver_version=driver_version,
        requested=want,
        visible=len(readings),
        gpus=tuple(readings),
        problems=tuple(failed + degraded),
    )


def _failures(r: GpuReading) -> list[str]:
    out = []
    if r.ecc_uncorrected:
        out.append(f"GPU {r.index}: {r.ecc_uncorrected} uncorrected ECC error(s)")
    if r.remap_failure:
        out.append(f"GPU {r.index}: memory row remapping failed (reset or replace the GPU)")
    if r.xid is not None and r.xid in CRITICAL_XIDS:
        out.append(f"GPU {r.index}: critical Xid {r.xid}")
    return out


def _warnings(r: GpuReading) -> list[str]:
    out = []
    if r.temperature_c is not None and r.temperature_c >= HOT_C:
        out.append(f"GPU {r.index}: {r.temperature_c} C")
    if r.retired_pages_pending:
        out.append(f"GPU {r.index}: retired pages pending (reset the GPU)")
    if r.xid is not None and r.xid not in CRITICAL_XIDS:
        out.append(f"GPU {r.index}: Xid {r.xid}")
    return out
