"""The GPUs of this machine as NVML sees them (never through CUDA, so no process inits it).

Without pynvml or an NVIDIA driver there is nothing to see: gpu_count() is None and
read_gpu() raises GpuUnreadable. machine_gpu_count() (how many GPU workers `genq up` starts)
asks nvidia-smi where pynvml is missing.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from types import ModuleType

from common.errors import GpuUnreadable


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    memory_total: int  # bytes
    memory_used: int  # bytes
    utilization: float | None  # busy fraction 0-1; None where the GPU does not report it


def _nvml() -> ModuleType:
    """pynvml, initialised (NVML counts its inits, so calling it again is cheap)."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def gpu_count() -> int | None:
    """How many GPUs NVML sees; None when pynvml or the driver is absent."""
    try:
        return int(_nvml().nvmlDeviceGetCount())
    except Exception:
        return None


def machine_gpu_count() -> int:
    """The GPUs of this machine: NVML's count, else nvidia-smi's list (a driver without
    pynvml installed), else 0."""
    count = gpu_count()
    if count is not None:
        return count
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


def read_gpu(index: int) -> GpuReading:
    """Name, memory and utilization of GPU `index`."""
    try:
        nvml = _nvml()
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception as exc:
        raise GpuUnreadable(str(exc)) from exc
    try:
        utilization: float | None = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
    except Exception:  # MIG slices and some boards do not report it
        utilization = None
    return GpuReading(index=index, name=name.decode() if isinstance(name, bytes) else str(name),
                      memory_total=int(memory.total), memory_used=int(memory.used),
                      utilization=utilization)
