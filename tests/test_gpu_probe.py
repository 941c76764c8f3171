"""The GPU probe on the NVML readings recorded on a real H200 (shared/fixtures/nvml/): every
call NVML answered, and every one it refused (NotSupported in a VM, Timeout for Xid events)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pynvml
import pytest

from agent.adapters import nvml
from agent.core.gpu import GpuReading, assess

# Recorded on a real H200 (copied from the team's shared/fixtures/nvml/, with its README).
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "nvml" / "nvml-h200.json"


class RecordedNvml:
    """The NVML module, answering from a recording: a field holding {"error": "NVMLError_X"}
    raises that NVML error, as the real library did."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError

    def __init__(self, data: dict[str, Any], init_error: str | None = None) -> None:
        self.data = data
        self.init_error = init_error
        self.calls: list[str] = []

    def _get(self, key: str) -> Any:
        self.calls.append(key)
        value = self.data[key]
        if isinstance(value, dict) and "error" in value:
            raise getattr(pynvml, value["error"])()
        return value

    def nvmlInit(self) -> None:
        if self.init_error:
            raise getattr(pynvml, self.init_error)()

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self._get("driver_version"))

    def nvmlDeviceGetCount(self) -> int:
        return int(self._get("device_count"))

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return str(self._get("name"))

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return str(self._get("uuid"))

    def nvmlDeviceGetMemoryInfo(self, h: int) -> dict[str, int]:
        return dict(self._get("memory"))

    def nvmlDeviceGetUtilizationRates(self, h: int) -> dict[str, int]:
        return dict(self._get("utilization"))

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return int(self._get("temperature_gpu_c"))

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return int(self._get("power_usage_mw"))

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return int(self._get("power_limit_mw"))

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        return int(self._get("ecc_uncorrected_volatile"))

    def nvmlDeviceGetRemappedRows(self, h: int) -> list[int]:
        return list(self._get("remapped_rows"))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: int) -> int:
        return int(self._get("retired_pages_pending"))

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return list(self._get("processes"))

    def nvmlEventSetCreate(self) -> int:
        return 1

    def nvmlDeviceRegisterEvents(self, h: int, kinds: int, event_set: int) -> None:
        return None

    def nvmlEventSetWait(self, event_set: int, ms: int) -> dict[str, int]:
        return dict(self._get("xid_event"))

    def nvmlEventSetFree(self, event_set: int) -> None:
        return None


@pytest.fixture
def recording() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURE.read_text())
    return data


def test_the_recorded_h200_reads_ok_with_unsupported_calls_as_unknown(recording: dict[str, Any]) -> None:
    lib = RecordedNvml(recording)
    facts = nvml.probe(1, lib)
    assert facts.status == "ok", facts
    assert facts.driver_version == "580.159.04" and facts.visible == 1
    [gpu] = facts.gpus
    assert gpu.name == "NVIDIA H200" and gpu.memory_total_bytes == 150754820096
    assert gpu.temperature_c == 34 and gpu.power_w == pytest.approx(77.89) and gpu.power_limit_w == 700
    assert gpu.ecc_uncorrected == 0 and gpu.remap_failure is False
    assert gpu.retired_pages_pending is None  # NotSupported in the VM: unknown, not bad
    assert gpu.xid is None  # Timeout: no Xid pending
    assert "shutdown" in lib.calls
    assert facts.summary() == "1x NVIDIA H200, 0.6/140.4 GiB, 34 C"


def test_more_gpus_requested_than_visible_is_failed(recording: dict[str, Any]) -> None:
    facts = nvml.probe(2, RecordedNvml(recording))
    assert facts.status == "failed" and facts.reason == "2 GPU(s) requested, 1 visible"


@pytest.mark.parametrize(
    ("change", "status", "why"),
    [
        ({"ecc_uncorrected_volatile": 2}, "failed", "2 uncorrected ECC error(s)"),
        ({"remapped_rows": [0, 1, 0, 1]}, "failed", "row remapping failed"),
        ({"xid_event": {"eventData": 79}}, "failed", "critical Xid 79"),
        ({"xid_event": {"eventData": 13}}, "degraded", "Xid 13"),
        ({"temperature_gpu_c": 91}, "degraded", "91 C"),
        ({"retired_pages_pending": 1}, "degraded", "retired pages pending"),
    ],
)
def test_bad_readings_are_named(recording: dict[str, Any], change: dict[str, Any], status: str, why: str) -> None:
    facts = nvml.probe(1, RecordedNvml({**recording, **change}))
    assert facts.status == status and why in facts.reason, facts


@pytest.mark.parametrize("error", ["NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded"])
def test_no_driver_is_unknown_not_failed(recording: dict[str, Any], error: str) -> None:
    facts = nvml.probe(1, RecordedNvml(recording, init_error=error))
    assert facts.status == "unknown" and "NVML" in facts.reason
    assert facts.summary().startswith("unknown")


def test_a_cpu_only_host_without_nvml_is_ok() -> None:
    assert assess(None, 0).status == "ok"
    assert assess(None, 1, "no driver").status == "unknown"


def test_this_machine_without_a_gpu_reads_unknown() -> None:
    """The real library on a machine with no NVIDIA driver (CI): unknown, never a crash."""
    facts = nvml.probe(1)
    assert facts.status in ("unknown", "ok", "degraded", "failed")
    if facts.status == "unknown":
        assert facts.reason


def test_readings_are_plain_data() -> None:
    reading = GpuReading(index=0, name="x", memory_total_bytes=1, memory_used_bytes=0)
    assert GpuReading.model_validate_json(reading.model_dump_json()) == reading
