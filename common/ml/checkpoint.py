"""Checkpoint directories: model.safetensors, config.json, tokenizer, state.pt, metrics.json.

A LoRA checkpoint holds peft's adapter_model.safetensors + adapter_config.json instead of
model.safetensors; its config.json says where the base is: the `source` (a hub id and
commit, a local folder) or, for a base built from a config, `base.uri`, a full checkpoint
of the base weights written once per run (common/ml/train.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model as save_weights

from common.adapter_spec import AdapterSpec
from common.errors import CheckpointError
from common.ml.adapters import add_adapter, base_of, is_adapted, load_adapter, save_adapter
from common.ml.families import AnyFamily, FamilyConfig, TextFamily, TextToImageFamily, get_family

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
FORMAT = 1


@dataclass
class LoadedModel:
    """Everything needed to generate from a checkpoint."""

    family: str
    kind: str
    config: FamilyConfig
    model: nn.Module
    tokenizer: Any | None
    device: str

    @classmethod
    def from_checkpoint(cls, path: Path, device: str = "cpu") -> LoadedModel:
        return load_model(path, device)


def save_checkpoint(path: Path, *, family: str, config: dict | FamilyConfig, model: nn.Module,
                    tokenizer_or_none: Any, train_state: dict | None, metrics: dict,
                    adapter: AdapterSpec | None = None, base: dict | None = None) -> None:
    """Write a complete checkpoint to a sibling temp dir, then rename it onto `path`; a
    model wrapped with an adapter saves the adapter alone (`adapter` is its spec, `base`
    where a from-config base is kept)."""
    path = Path(path)
    module = get_family(family)
    cfg = config if isinstance(config, FamilyConfig) else module.Config.model_validate(config)
    meta: dict[str, Any] = {"format": FORMAT, "family": family, "kind": module.KIND,
                            "config": cfg.model_dump()}
    arch = module.architecture(base_of(model))
    if arch is not None:
        meta["arch"] = arch
    source = module.source(cfg)
    if source is not None:  # where the starting weights came from: a hub commit, a folder
        meta["source"] = source.model_dump(exclude_none=True)
    adapted = is_adapted(model)
    if adapted != (adapter is not None):
        raise ValueError("save_checkpoint: give `adapter` exactly when the model has one")
    if adapter is not None:
        meta["adapter"] = adapter.model_dump()
        if base is not None:
            meta["base"] = base
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if adapted:
            save_adapter(model, tmp)
        else:
            save_weights(model, str(tmp / MODEL_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
        if isinstance(module, TextFamily | TextToImageFamily) and tokenizer_or_none is not None:
            module.save_tokenizer(tokenizer_or_none, tmp)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        old = None
        if path.exists():  # rename cannot replace a non-empty directory: move it aside first
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(path: Path) -> dict:
    """The parsed config.json of a checkpoint."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint ({CONFIG_FILE} missing)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt JSON ({e})") from e
    if not isinstance(meta, dict) or not {"family", "config"} <= meta.keys():
        raise CheckpointError(f"{file}: needs 'family' and 'config'")
    return meta


def load_model(path: Path, device: str = "cpu", dtype: torch.dtype | None = None,
               locate: Callable[[str], Path] = Path, adapter_name: str = "default") -> LoadedModel:
    """Rebuild the model (safetensors weights only) and its tokenizer from a checkpoint;
    `dtype` casts its floating-point weights (bf16 for generation on a GPU); `locate` turns
    a LoRA checkpoint's base.uri into a local folder, and its adapter is `adapter_name`."""
    path = Path(path)
    meta = read_meta(path)
    try:
        module = get_family(meta["family"])
        config = module.Config.model_validate(meta["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    tokenizer = load_tokenizer(module, path)
    if "adapter" in meta:
        base = load_base(module, meta, config, tokenizer, locate)
        model = load_adapter(base, path, name=adapter_name)
    else:
        model = module.build_model(config, tokenizer, arch=meta.get("arch"))
        load_weights_into(model, path)
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(family=meta["family"], kind=module.KIND, config=config, model=model,
                       tokenizer=tokenizer, device=str(device))


def with_adapter_of(loaded: LoadedModel, path: Path, name: str) -> LoadedModel:
    """`loaded` (a LoRA model) with the adapter of checkpoint `path` added as `name`, on the
    same base: the returned model is the same object, with that checkpoint's tokenizer."""
    meta = read_meta(path)
    module = get_family(meta["family"])
    add_adapter(loaded.model, Path(path), name)
    return LoadedModel(family=meta["family"], kind=module.KIND,
                       config=module.Config.model_validate(meta["config"]), model=loaded.model,
                       tokenizer=load_tokenizer(module, path), device=loaded.device)


def base_identity(meta: dict) -> str | None:
    """What a LoRA checkpoint's base is, alike for every adapter of it: the stored base, the
    hub id at its commit, or the local folder; None for a checkpoint with no adapter."""
    if "adapter" not in meta:
        return None
    if meta.get("base"):
        return f"stored {meta['base']['uri']}"
    source = meta.get("source") or {}
    if source.get("hub_id"):
        return f"hub {source['hub_id']}@{source.get('commit') or source.get('revision')}"
    return f"local {source.get('local_dir')}"


def load_base(module: AnyFamily, meta: dict, config: FamilyConfig, tokenizer: Any,
              locate: Callable[[str], Path] = Path) -> nn.Module:
    """The base weights under a LoRA checkpoint: its stored base, else its source (the hub
    commit it resolved to, or the local folder)."""
    if meta.get("base"):
        base_dir = locate(meta["base"]["uri"])
        model = module.build_model(config, tokenizer, arch=meta.get("arch"))
        load_weights_into(model, base_dir)
        return model
    if not meta.get("source"):
        raise CheckpointError("config.json: a LoRA checkpoint needs a `source` or a `base`")
    return module.build_model(config, tokenizer)


def load_tokenizer(module: AnyFamily, path: Path) -> Any | None:
    """The checkpoint's tokenizer (None for the image families that take no prompt)."""
    if not isinstance(module, TextFamily | TextToImageFamily):
        return None
    try:
        return module.load_tokenizer(Path(path))
    except Exception as e:  # tokenizer libraries raise assorted errors for bad files
        raise CheckpointError(f"{path}: tokenizer files missing or corrupt ({e})") from e


def load_weights_into(model: nn.Module, path: Path) -> None:
    """Fill `model` from the checkpoint's model.safetensors; CheckpointError if unusable."""
    weights = Path(path) / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        load_weights(model, str(weights), strict=True)
    except Exception as e:  # SafetensorError, RuntimeError (shape/key mismatch), OSError
        raise CheckpointError(f"{weights}: corrupt or does not match the config ({e})") from e


def load_train_state(path: Path) -> dict:
    """The optimizer/scheduler/RNG/data state saved with a checkpoint (weights_only load)."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the checkpoint has no training state)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors for a truncated or foreign file
        raise CheckpointError(f"{file}: corrupt ({e})") from e


def load_metrics(path: Path) -> dict:
    """The metrics.json of a checkpoint ({} if absent)."""
    file = Path(path) / METRICS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}
