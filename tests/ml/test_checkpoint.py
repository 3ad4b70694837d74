"""Checkpoint directories: safetensors round trip, clear errors for broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.ml.checkpoint import (
    CheckpointError,
    load_model,
    load_train_state,
    save_checkpoint,
)
from common.ml.families import get_family
from common.ml.train import TrainOutcome


@pytest.mark.parametrize("family", ["vae", "gan", "lstm", "gpt"])
def test_round_trip(trained: dict[str, TrainOutcome], family: str, tmp_path: Path) -> None:
    loaded = load_model(trained[family].checkpoint)
    assert loaded.family == family and loaded.kind == get_family(family).KIND
    assert (loaded.tokenizer is None) == (loaded.kind == "image")
    copy = tmp_path / "copy"
    save_checkpoint(copy, family=family, config=loaded.config, model=loaded.model,
                    tokenizer_or_none=loaded.tokenizer, train_state={"step": 3},
                    metrics={"loss": 1.5})
    again = load_model(copy)
    a, b = loaded.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == loaded.config
    meta = json.loads((copy / "config.json").read_text())
    assert meta["family"] == family and meta["kind"] == loaded.kind
    assert json.loads((copy / "metrics.json").read_text()) == {"loss": 1.5}
    assert load_train_state(copy) == {"step": 3}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_replaces_existing_checkpoint(trained: dict[str, TrainOutcome],
                                           tmp_path: Path) -> None:
    loaded = load_model(trained["vae"].checkpoint)
    for loss in (1.0, 2.0):
        save_checkpoint(tmp_path / "ck", family="vae", config=loaded.config, model=loaded.model,
                        tokenizer_or_none=None, train_state=None, metrics={"loss": loss})
    assert json.loads((tmp_path / "ck" / "metrics.json").read_text()) == {"loss": 2.0}
    with pytest.raises(CheckpointError, match="state.pt"):
        load_train_state(tmp_path / "ck")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_raise_checkpoint_error(trained: dict[str, TrainOutcome],
                                                  tmp_path: Path) -> None:
    ck = _copy(trained["gpt"].checkpoint, tmp_path / "ck")
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_model(ck)


def test_missing_and_corrupt_files(trained: dict[str, TrainOutcome], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json missing"):
        load_model(tmp_path)
    ck = _copy(trained["lstm"].checkpoint, tmp_path / "ck")
    (ck / "state.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="state.pt: corrupt"):
        load_train_state(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_model(ck)
    (ck / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        load_model(ck)
