"""GPU facts through NVML (common/gpus.py) and its three readers, with a stand-in pynvml."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest

from common.errors import GpuUnreadable
from common.gpus import gpu_count, machine_gpu_count, read_gpu


class FakeNvml:
    """pynvml's calls genq makes, over a list of (name, total, used, busy %) per GPU."""

    def __init__(self, gpus: list[tuple[Any, int, int, int | None]]):
        self.gpus = gpus

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if i >= len(self.gpus):
            raise RuntimeError("Invalid Argument")
        return i

    def nvmlDeviceGetName(self, h: int) -> Any:
        return self.gpus[h][0]

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=self.gpus[h][1], used=self.gpus[h][2])

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        busy = self.gpus[h][3]
        if busy is None:
            raise RuntimeError("Not Supported")
        return SimpleNamespace(gpu=busy)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml([(b"NVIDIA H100", 80 << 30, 1 << 30, 50),
                     ("NVIDIA A100 MIG", 10 << 30, 0, None)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_reads_each_gpu(nvml: FakeNvml) -> None:
    assert gpu_count() == 2
    first, second = read_gpu(0), read_gpu(1)
    assert (first.name, first.memory_total, first.memory_used, first.utilization) == (
        "NVIDIA H100", 80 << 30, 1 << 30, 0.5)
    assert second.name == "NVIDIA A100 MIG" and second.utilization is None
    with pytest.raises(GpuUnreadable, match="Invalid Argument"):
        read_gpu(2)


def test_without_nvml_there_is_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails
    assert gpu_count() is None
    with pytest.raises(GpuUnreadable):
        read_gpu(0)


def test_readers(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.prometheus import gpus
    from worker.device import describe_device

    assert machine_gpu_count() == 2
    assert describe_device(0) == {"type": "cuda:0", "name": "NVIDIA H100",
                                  "memory_bytes": 80 << 30}
    assert describe_device(1)["name"] == "NVIDIA A100 MIG"
    assert describe_device(None)["type"] == "cpu"
    series = {m.name: [(s.labels, s.value) for s in m.samples] for m in gpus()}
    assert series == {
        "genq_gpu_memory_used_bytes": [({"gpu": "0", "name": "NVIDIA H100"}, float(1 << 30))],
        "genq_gpu_memory_total_bytes": [({"gpu": "0", "name": "NVIDIA H100"}, float(80 << 30))],
        "genq_gpu_utilization_ratio": [({"gpu": "0", "name": "NVIDIA H100"}, 0.5)],
    }
    monkeypatch.setitem(sys.modules, "pynvml", None)
    undescribed = describe_device(3)
    assert undescribed.keys() == {"type", "note"} and undescribed["type"] == "cuda:3"
    assert undescribed["note"].startswith("nvml unavailable: ")
    assert list(gpus()) == []
