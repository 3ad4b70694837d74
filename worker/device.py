"""Which device this worker process computes on; CUDA is touched only in the pool child."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from common.errors import GpuUnreadable
from common.gpus import read_gpu


@lru_cache
def current_device() -> str:
    """cuda when this process was given a GPU and CUDA works, else cpu."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "") in ("", "-1"):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(device: str) -> Any:
    """The torch dtype text models generate in on this device: GENQ_GPU_DTYPE on a GPU
    (bf16 falls back to fp16 where the GPU lacks it), else None (keep fp32)."""
    if not device.startswith("cuda"):
        return None
    import torch

    from common.config import get_settings

    wanted = get_settings().gpu_dtype
    if wanted == "bf16" and not torch.cuda.is_bf16_supported():
        wanted = "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[wanted]


def describe_device(gpu: int | None) -> dict[str, Any]:
    """Device facts for the workers table, read through NVML so the parent never inits CUDA."""
    if gpu is None:
        return {"type": "cpu", "cores": os.cpu_count()}
    try:
        reading = read_gpu(gpu)
    except GpuUnreadable as exc:  # no NVML: still a GPU worker, just undescribed
        return {"type": f"cuda:{gpu}", "note": f"nvml unavailable: {exc}"}
    return {"type": f"cuda:{gpu}", "name": reading.name, "memory_bytes": reading.memory_total}
