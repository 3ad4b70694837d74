"""The worker's malloc thresholds: a tensor-sized block comes from the heap, not its own mmap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")

# In a fresh interpreter: malloc 1 MiB and report whether glibc served it with its own mmap
# (mallinfo2's hblks counts live mmapped blocks), with or without tune_malloc first.
PROBE = """
import ctypes, sys
from worker.malloc import tune_malloc

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks "
                "fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
tuned = tune_malloc() if sys.argv[1] == "tune" else None
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print(tuned, libc.mallinfo2().hblks - before)
"""


def probe(mode: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **env},
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    return out.stdout.strip()


def test_tuned_malloc_serves_tensor_sized_blocks_from_the_heap() -> None:
    assert probe("plain") == "None 1"  # glibc's default: a 1 MiB block is its own mmap
    assert probe("tune") == "True 0"


def test_a_users_own_malloc_setting_wins() -> None:
    assert probe("tune", MALLOC_MMAP_THRESHOLD_="131072") == "False 1"
