"""Per-process LRU cache of loaded models, so a stream of jobs for one model loads it once."""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict

from sqlalchemy.orm import Session

from common.config import get_settings
from common.errors import NotFound
from common.ml.checkpoint import LoadedModel, load_model
from common.models import Checkpoint, Model
from common.storage import get_storage
from worker.device import inference_dtype

log = logging.getLogger(__name__)

_cache: OrderedDict[str, tuple[LoadedModel, int]] = OrderedDict()


def model_bytes(loaded: LoadedModel) -> int:
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def get_model(session: Session, model_id: str, device: str) -> LoadedModel:
    """The loaded model for model_id on device, from the cache or storage."""
    key = f"{model_id}@{device}"
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key][0]
    model = session.get(Model, model_id)
    ckpt = session.get(Checkpoint, model.checkpoint_id) if model else None
    if model is None or ckpt is None:
        raise NotFound(f"model {model_id!r} is gone", param="model", code="model_not_found")
    settings = get_settings()
    storage = get_storage()
    local = storage.local_dir(storage.key_of(ckpt.uri), settings.home_dir / "cache")
    loaded = load_model(local, device=device, locate=lambda uri: storage.local_dir(
        storage.key_of(uri), settings.home_dir / "cache"))
    dtype = inference_dtype(device) if loaded.kind == "text" else None  # images stay fp32
    loaded.model.to(dtype=dtype).eval()
    size = model_bytes(loaded)
    _cache[key] = (loaded, size)
    while len(_cache) > 1 and sum(s for _, s in _cache.values()) > settings.model_cache_bytes:
        evicted, _ = _cache.popitem(last=False)
        gc.unfreeze()  # the evicted model's reference cycles become collectable again
        log.info("model cache: evicted %s", evicted)
    log.info("model cache: loaded %s (%d bytes) on %s", model_id, size, device)
    keep_out_of_gc()
    return loaded


def keep_out_of_gc() -> None:
    """Move what is alive now (cached models, the modules their loading imported) out of
    the cyclic collector, as worker/main.py does at child start: a full collection would
    otherwise walk these hundreds of thousands of objects, about 0.1 s each time. The running
    job's own objects are frozen too; refcounting still frees them, and the few in reference
    cycles wait for the next eviction's unfreeze (loads are rare, so this stays small)."""
    gc.collect()
    gc.freeze()
