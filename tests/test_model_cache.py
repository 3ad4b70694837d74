"""The worker's model cache keeps what it loads out of the cyclic garbage collector."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

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


def test_lora_models_of_one_base_share_one_entry(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two adapters of one local base: one cache entry holding the base once and both
    adapters (its size counts each), switched per model; eviction drops it whole."""
    from pydoc_data.topics import topics
    from types import SimpleNamespace

    import torch

    from common.config import get_settings
    from common.ml.train import TrainHooks, run_training
    from tests.test_lm import tiny_hub_model
    from worker import model_cache

    monkeypatch.setenv("GENQ_PRETRAINED_ROOT", str(tmp_path))
    get_settings.cache_clear()
    torch.manual_seed(0)
    tiny_hub_model(tmp_path / "base")
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(topics.values())[:5_000])
    checkpoints = {}
    for name, seed in (("a", 1), ("b", 2), ("full", 3)):
        spec = {"family": "lm", "config": {"pretrained": str(tmp_path / "base")},
                "data": {"path": str(text)}, "steps": 2, "seq_len": 16, "batch_size": 2,
                "seed": seed}
        if name != "full":
            spec["adapter"] = {"r": 2, "target_modules": ["q_proj"]}
        checkpoints[name] = run_training(spec, tmp_path / name, hooks=TrainHooks()).checkpoint

    class Session:
        def get(self, cls, key):  # type: ignore[no-untyped-def]
            if cls is model_cache.Model:
                return SimpleNamespace(checkpoint_id=key)
            return SimpleNamespace(uri=str(checkpoints[key]))

        def commit(self) -> None:
            pass

    storage = SimpleNamespace(key_of=lambda uri: uri, local_dir=lambda key, cache: Path(key))
    monkeypatch.setattr(model_cache, "get_storage", lambda: storage)
    monkeypatch.setattr(model_cache, "_cache", model_cache.OrderedDict())
    monkeypatch.setattr(model_cache, "_home", {})
    try:
        a = model_cache.get_model(Session(), "a", "cpu")  # type: ignore[arg-type]
        base_and_a = model_cache.model_bytes(a)
        b = model_cache.get_model(Session(), "b", "cpu")  # type: ignore[arg-type]
        assert a.model is b.model and len(model_cache._cache) == 1
        (entry,) = model_cache._cache.values()
        assert set(entry.adapters) == {"a", "b"}
        lora = sum(p.numel() * p.element_size() for n, p in a.model.named_parameters()
                   if "lora_" in n)
        assert entry.size == base_and_a + lora // 2  # plus b's adapter, not a second base
        assert model_cache.get_model(Session(), "a", "cpu") is a  # type: ignore[arg-type]
        assert a.model.active_adapter == "a"
        model_cache.get_model(Session(), "b", "cpu")  # type: ignore[arg-type]
        assert a.model.active_adapter == "b"
        monkeypatch.setenv("GENQ_MODEL_CACHE_BYTES", "1")  # room for one entry only
        get_settings.cache_clear()
        model_cache.get_model(Session(), "full", "cpu")  # type: ignore[arg-type]
        assert list(model_cache._home) == ["full@cpu"] and len(model_cache._cache) == 1
    finally:
        gc.unfreeze()
        get_settings.cache_clear()
