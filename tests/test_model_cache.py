"""The worker's model cache keeps what it loads out of the cyclic garbage collector."""

from __future__ import annotations

import gc
import weakref

from worker.model_cache import keep_out_of_gc


def test_keep_out_of_gc_freezes_what_is_alive_and_collects_garbage_first() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a reference cycle: only the cyclic collector frees it

    alive = [Node() for _ in range(1000)]
    garbage = weakref.ref(Node())  # unreachable at once, but alive until a collection
    before = gc.get_freeze_count()
    try:
        keep_out_of_gc()
        assert gc.get_freeze_count() >= before + len(alive)
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(n) in tracked for n in alive)  # frozen: full passes skip them
        assert garbage() is None  # collected before the freeze, not kept forever
    finally:
        gc.unfreeze()
