"""Run a job body at the start of a roomy chunk of CPython's frame stack.

CPython 3.11 and 3.12 keep Python frames in chunks (16 KiB for ordinary frames) and free a
chunk as soon as the frame at its base returns. Code that calls in and out across a chunk
boundary therefore maps and unmaps a chunk on every call (CPython gh-142183, fixed in
3.13.x by caching one chunk). A Celery task runs some 40 frames deep, and there a
generation loop's calls into the model's modules crossed a boundary: thousands of
mmap/munmap pairs a second, each a TLB shootdown that stalls torch's other thread. The
same `generate()` call ran 25-40% slower in a worker than in a plain script.

`call_on_fresh_chunk` calls the body from a frame too big for any ordinary chunk, so
CPython gives it a chunk of its own with tens of KiB to spare, and the body's frames start
there whatever the caller's depth. The cost is one chunk per call (128 KiB).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# CPython sizes a new chunk as the smallest power of two, from 16 KiB, that holds the frame
# plus 1,000 slots of headroom: a frame of ~7,200 slots (8 bytes each) just passes 64 KiB,
# so its chunk is 128 KiB and about 70 KiB (well over 100 frames) is left for the body.
PAD_SLOTS = 7200

_SOURCE = (
    "def call(fn, args, kwargs):\n"
    "    return fn(*args, **kwargs)\n"
    # Never runs; it only makes the names locals, and locals are what size the frame.
    "    " + " = ".join(f"_{i}" for i in range(PAD_SLOTS)) + " = None\n"
)
_namespace: dict[str, Any] = {}
exec(compile(_SOURCE, "<frame_stack pad>", "exec"), _namespace)
_padded_call: Callable[..., Any] = _namespace["call"]


def call_on_fresh_chunk(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs), its Python frames starting on a frame-stack chunk of their own."""
    result: T = _padded_call(fn, args, kwargs)
    return result
