"""Config and data validation: every problem listed, each naming its field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.ml.data import ImageData, TextData, load_data, validate_data
from common.ml.families import FAMILIES, get_family, validate_model_config


def _images(data: dict) -> ImageData:
    loaded = load_data(data, "image")
    assert isinstance(loaded, ImageData)
    return loaded


def _text(data: dict) -> str:
    loaded = load_data(data, "text")
    assert isinstance(loaded, TextData)
    return loaded.text


def test_registry() -> None:
    assert set(FAMILIES) == {"vae", "gan", "lstm", "gpt"}
    assert {get_family(f).KIND for f in FAMILIES} == {"text", "image"}
    with pytest.raises(ValueError, match="unknown family 'diffusion'"):
        get_family("diffusion")


@pytest.mark.parametrize("family", ["vae", "gan", "lstm", "gpt"])
def test_defaults_are_valid(family: str) -> None:
    assert validate_model_config(family, {}) == []


def test_config_lists_every_bad_field(tmp_path: Path) -> None:
    problems = validate_model_config("gpt", {"n_layer": 0, "n_head": "two", "dropout": 1.5,
                                             "wat": 1, "pretrained": str(tmp_path)})
    fields = sorted(p.split(":")[0] for p in problems)
    assert fields == ["config.dropout", "config.n_head", "config.n_layer", "config.pretrained",
                      "config.wat"]
    assert "config.n_layer: must be in [1, 1024]" in problems
    assert validate_model_config("gpt", {"n_embd": 30, "n_head": 4}) == [
        "config.n_embd: must be divisible by n_head (4), got 30"]
    assert validate_model_config("vae", {"conditional": 1, "latent": 2.5}) == [
        "config.conditional: must be bool, got 1", "config.latent: must be int, got 2.5"]
    assert validate_model_config("nope", {})[0].startswith("family:")


def test_builtin_data() -> None:
    digits = _images({"builtin": "digits"})
    assert digits.images.shape == (1797, 1, 8, 8) and digits.n_classes == 10
    assert 0 <= float(digits.images.min()) and float(digits.images.max()) <= 1
    assert len(_text({"builtin": "python-docs"})) > 100_000
    assert validate_data({"builtin": "mnist"}, "image")[0].startswith("data.builtin: unknown")
    assert validate_data({"builtin": "digits"}, "text")[0].startswith("data.builtin:")
    assert validate_data({"builtin": "digits", "path": "/x", "x": 1}, "image") == [
        "data.x: unknown field (allowed: builtin, path)",
        "data: give exactly one of 'builtin' or 'path'"]


def test_uploaded_text(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert validate_data({"path": str(empty)}, "text") == ["data.path: empty.txt has no text "
                                                           "to train on"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "hello"}\n{"txt": 1}\nnot json\n')
    problems = validate_data({"path": str(jsonl)}, "text")
    assert len(problems) == 2 and "line 2" in problems[0] and "line 3" in problems[1]
    jsonl.write_text('{"text": "hello"}\n{"text": "world"}\n')
    assert _text({"path": str(jsonl)}) == "hello\n\nworld"
    assert validate_data({"path": str(tmp_path / "missing.txt")}, "text")[0].endswith(
        "does not exist")


def test_uploaded_images(tmp_path: Path, npz_digits: Path) -> None:
    data = _images({"path": str(npz_digits)})
    assert data.images.shape == (64, 1, 8, 8) and data.labels is not None
    assert float(data.images.max()) <= 1.0
    assert validate_data({"path": str(npz_digits)}, "text")[0].startswith("data.path:")
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.full((4, 8, 8), 300.0), labels=np.arange(3))
    problems = validate_data({"path": str(bad)}, "image")
    assert len(problems) == 2 and all(p.startswith("data.path:") for p in problems)
    np.savez(bad, pictures=np.zeros((2, 8, 8)))
    assert "no 'images' array" in validate_data({"path": str(bad)}, "image")[0]
    bad.write_bytes(b"garbage")
    assert "not a readable .npz" in validate_data({"path": str(bad)}, "image")[0]


def test_png_directory(tmp_path: Path) -> None:
    from PIL import Image

    for label in (0, 1):
        (tmp_path / str(label)).mkdir()
        for i in range(3):
            Image.new("RGB", (6, 5), (label * 200, i * 50, 0)).save(tmp_path / str(label)
                                                                     / f"{i}.png")
    data = _images({"path": str(tmp_path)})
    assert data.labels is not None and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images.shape == (6, 3, 5, 6)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert validate_data({"path": str(empty)}, "image")[0].endswith("has no .png files")


def test_unsupported_file_type(tmp_path: Path) -> None:
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    assert validate_data({"path": str(csv)}, "text")[0].startswith(
        "data.path: unsupported file type '.csv'")
