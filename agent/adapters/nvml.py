"""GPU readings through NVML (``nvidia-ml-py``, NVIDIA's own bindings): the only module that
talks to the driver. Every NVML error is mapped here: a call the GPU does not support (fan
speed, retired pages in a VM) reads as ``None``; no library or no driver at all makes the
whole reading ``None`` with the reason, which ``agent.core.gpu.assess`` reports as unknown.

``read(lib)`` takes the NVML module as an argument (default: ``pynvml``), so tests feed it the
readings recorded on a real H200 (``shared/fixtures/nvml/``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from agent.core.gpu import GpuFacts, GpuReading, assess

T = TypeVar("T")
#: how long to wait for a pending Xid event (0: only what is already queued)
XID_WAIT_MS = 0


def probe(requested: int | str | None, lib: Any = None) -> GpuFacts:
    """Read and judge; never raises."""
    readings, why, driver = read(lib)
    want: Any = requested if requested in (None, "all") or isinstance(requested, int) else None
    return assess(readings, want, why, driver)


def read(lib: Any = None) -> tuple[list[GpuReading] | None, str, str | None]:
    """(readings or None, why None, driver version)."""
    if lib is None:
        try:
            import pynvml
        except ImportError:
            return None, "nvidia-ml-py is not installed", None
        lib = pynvml
    try:
        lib.nvmlInit()
    except lib.NVMLError as exc:
        return None, f"NVML: {exc}", None
    except OSError as exc:  # the shared library itself
        return None, f"NVML: {exc}", None
    try:
        driver = _maybe(lib, lib.nvmlSystemGetDriverVersion)
        count = lib.nvmlDeviceGetCount()
        return [_device(lib, i) for i in range(count)], "", _text(driver)
    except lib.NVMLError as exc:
        return None, f"NVML: {exc}", None
    finally:
        _maybe(lib, lib.nvmlShutdown)


def _device(lib: Any, index: int) -> GpuReading:
    h = lib.nvmlDeviceGetHandleByIndex(index)

    def get(fn: Callable[..., T], *args: Any) -> T | None:
        return _maybe(lib, fn, h, *args)

    memory = get(lib.nvmlDeviceGetMemoryInfo)
    util = get(lib.nvmlDeviceGetUtilizationRates)
    power = get(lib.nvmlDeviceGetPowerUsage)
    limit = get(lib.nvmlDeviceGetEnforcedPowerLimit)
    remapped = get(lib.nvmlDeviceGetRemappedRows)
    retired = get(lib.nvmlDeviceGetRetiredPagesPendingStatus)
    processes = get(lib.nvmlDeviceGetComputeRunningProcesses)
    return GpuReading(
        index=index,
        name=_text(get(lib.nvmlDeviceGetName)) or "",
        uuid=_text(get(lib.nvmlDeviceGetUUID)) or "",
        memory_total_bytes=_attr(memory, "total"),
        memory_used_bytes=_attr(memory, "used"),
        temperature_c=get(lib.nvmlDeviceGetTemperature, lib.NVML_TEMPERATURE_GPU),
        power_w=power / 1000 if isinstance(power, int | float) else None,
        power_limit_w=limit / 1000 if isinstance(limit, int | float) else None,
        utilization_pct=_attr(util, "gpu"),
        ecc_uncorrected=get(
            lib.nvmlDeviceGetTotalEccErrors, lib.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, lib.NVML_VOLATILE_ECC
        ),
        # (corrected rows, uncorrected rows, pending, failure)
        remap_failure=bool(remapped[3]) if isinstance(remapped, list | tuple) and len(remapped) == 4 else None,
        retired_pages_pending=bool(retired) if retired is not None else None,
        xid=_pending_xid(lib, h),
        processes=len(processes) if isinstance(processes, list | tuple) else None,
    )


def _pending_xid(lib: Any, handle: Any) -> int | None:
    """A critical Xid already queued for this GPU, if any (no waiting)."""
    event_set = _maybe(lib, lib.nvmlEventSetCreate)
    if event_set is None:
        return None
    try:
        if _maybe(lib, lib.nvmlDeviceRegisterEvents, handle, lib.nvmlEventTypeXidCriticalError, event_set) is None:
            pass  # registration unsupported: the wait below reads nothing
        data = _maybe(lib, lib.nvmlEventSetWait, event_set, XID_WAIT_MS)
        value = _attr(data, "eventData")
        return value if isinstance(value, int) else None
    finally:
        _maybe(lib, lib.nvmlEventSetFree, event_set)


def _maybe(lib: Any, fn: Callable[..., T], *args: Any) -> T | None:
    try:
        return fn(*args)
    except lib.NVMLError:
        return None


def _attr(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
