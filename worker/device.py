"""Which device this worker process computes on; CUDA is touched only in the pool child."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any


@lru_cache
def current_device() -> str:
    """cuda when this process was given a GPU and CUDA works, else cpu."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "") in ("", "-1"):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device(gpu: int | None) -> dict[str, Any]:
    """Device facts for the workers table, read through NVML so the parent never inits CUDA."""
    if gpu is None:
        return {"type": "cpu", "cores": os.cpu_count()}
    info: dict[str, Any] = {"type": f"cuda:{gpu}"}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
        name = pynvml.nvmlDeviceGetName(handle)
        info["name"] = name.decode() if isinstance(name, bytes) else name
        info["memory_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except Exception as exc:  # no NVML: still a GPU worker, just undescribed
        info["note"] = f"nvml unavailable: {exc}"
    return info
