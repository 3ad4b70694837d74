"""Per-process LRU cache of loaded models, so a stream of jobs for one model loads it once.

A LoRA model's entry is its base: every adapter of one base (the same stored base, hub
commit or local folder) is loaded onto that one peft model and switched to with
set_adapter, so the base's weights are held once however many of its adapters serve. The
entry's size is the base's bytes plus each loaded adapter's; eviction drops the base with
all its adapters.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from common.config import get_settings
from common.errors import NotFound
from common.ml.checkpoint import LoadedModel, base_identity, load_model, read_meta, with_adapter_of
from common.models import Checkpoint, Model
from common.storage import get_storage
from worker.device import inference_dtype

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """A cached model; for a LoRA base, the view of each model whose adapter it holds."""

    loaded: LoadedModel
    size: int
    adapters: dict[str, LoadedModel] = field(default_factory=dict)  # model id -> its view


_cache: OrderedDict[str, Entry] = OrderedDict()
_home: dict[str, str] = {}  # model_id@device -> the key of the entry that serves it


def model_bytes(loaded: LoadedModel) -> int:
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def get_model(session: Session, model_id: str, device: str) -> LoadedModel:
    """The loaded model for model_id on device, from the cache or storage. A LoRA model is
    its base's active adapter until the next call (a shard serves one model at a time)."""
    key = f"{model_id}@{device}"
    if key in _home:
        _cache.move_to_end(_home[key])
        return _active(_cache[_home[key]], model_id)
    model = session.get(Model, model_id)
    ckpt = session.get(Checkpoint, model.checkpoint_id) if model else None
    if model is None or ckpt is None:
        raise NotFound(f"model {model_id!r} is gone", param="model", code="model_not_found")
    session.commit()  # rows read: no connection held through the load (see
    # JobContext.release_connection: a job's next write failed on one an outage had cut)
    settings = get_settings()
    storage = get_storage()
    cache_dir = settings.home_dir / "cache"
    local = storage.local_dir(storage.key_of(ckpt.uri), cache_dir)
    base = base_identity(read_meta(local))
    entry_key = f"base {base}@{device}" if base else key
    entry = _cache.get(entry_key)
    if entry is not None:  # another adapter of a cached base: only the adapter loads
        entry.adapters[model_id] = with_adapter_of(entry.loaded, local, model_id)
        log.info("model cache: adapter %s added to the cached base %s", model_id, base)
    else:
        def locate(uri: str) -> Path:
            return storage.local_dir(storage.key_of(uri), cache_dir)

        loaded = load_model(local, device=device, locate=locate, adapter_name=model_id)
        entry = Entry(loaded, 0, {model_id: loaded} if base else {})
        _cache[entry_key] = entry
        log.info("model cache: loaded %s on %s%s", model_id, device,
                 f" with its base {base}" if base else "")
    dtype = inference_dtype(device) if entry.loaded.kind == "text" else None  # images: fp32
    entry.loaded.model.to(dtype=dtype).eval()
    entry.size = model_bytes(entry.loaded)
    _home[key] = entry_key
    _cache.move_to_end(entry_key)
    while len(_cache) > 1 and sum(e.size for e in _cache.values()) > settings.model_cache_bytes:
        evicted, _ = _cache.popitem(last=False)
        for served in [k for k, home in _home.items() if home == evicted]:
            del _home[served]
        gc.unfreeze()  # the evicted model's reference cycles become collectable again
        log.info("model cache: evicted %s", evicted)
    log.info("model cache: %s holds %d bytes", entry_key, entry.size)
    keep_out_of_gc()
    return _active(entry, model_id)


def _active(entry: Entry, model_id: str) -> LoadedModel:
    """The entry's model, switched to model_id's adapter when it is a LoRA base."""
    if not entry.adapters:
        return entry.loaded
    entry.loaded.model.set_adapter(model_id)  # type: ignore[operator]
    return entry.adapters[model_id]


def keep_out_of_gc() -> None:
    """Move what is alive now (cached models, the modules their loading imported) out of
    the cyclic collector, as worker/main.py does at child start: a full collection would
    otherwise walk these hundreds of thousands of objects, about 0.1 s each time. The running
    job's own objects are frozen too; refcounting still frees them, and the few in reference
    cycles wait for the next eviction's unfreeze (loads are rare, so this stays small)."""
    gc.collect()
    gc.freeze()
