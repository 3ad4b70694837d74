"""worker.frame_stack: a job body's calls do not map and unmap a frame-stack chunk each.

The evidence is page faults: a chunk CPython maps afresh faults when first written, so
calls that straddle a chunk boundary fault about once each. No timings.
"""

from __future__ import annotations

import resource
import sys

import pytest

from worker.frame_stack import call_on_fresh_chunk

CALLS = 500
DEPTHS = 260  # ~100-byte frames: 26 KB of depths, more than one 16 KiB chunk

# The leaf's frame (~60 slots) is several steps of the descent (~12 slots) long, so at
# some depth of the scan the leaf, and only the leaf, overflows its caller's chunk.
_namespace: dict = {}
exec("def leaf():\n    return None\n    " + " = ".join(f"_{i}" for i in range(48)) + " = None\n",
     _namespace)
_leaf = _namespace["leaf"]


def _faults_at(depth: int) -> int:
    """Minor page faults of CALLS calls made `depth` frames below here."""
    if depth:
        return _faults_at(depth - 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(CALLS):
        _leaf()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _worst_depth() -> int:
    """The most faults that CALLS calls cost at any of the scanned depths."""
    return max(_faults_at(depth) for depth in range(DEPTHS))


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="3.13+ keeps one chunk (gh-142183)")
def test_a_loop_on_a_chunk_boundary_maps_a_chunk_per_call() -> None:
    """The control: somewhere in the scan, plain calls cross a boundary and fault each time."""
    assert _worst_depth() >= CALLS // 2


def test_calls_on_a_fresh_chunk_do_not_cross_a_boundary() -> None:
    assert call_on_fresh_chunk(_worst_depth) < CALLS // 10


def test_call_on_fresh_chunk_passes_arguments_results_and_errors() -> None:
    assert call_on_fresh_chunk(lambda a, *, b: (a, b), 1, b=2) == (1, 2)
    with pytest.raises(KeyError, match="missing"):
        call_on_fresh_chunk({}.__getitem__, "missing")
