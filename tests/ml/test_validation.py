"""Config and data validation: every problem listed, each naming its field."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import DataError
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
    assert set(FAMILIES) == {"vae", "gan", "diffusion", "lstm", "lm", "gpt"}
    assert get_family("gpt") is get_family("lm")  # the old name is an alias
    assert {get_family(f).KIND for f in FAMILIES} == {"text", "image"}
    with pytest.raises(ValueError, match="unknown family 'dalle'"):
        get_family("dalle")


def test_each_family_fact_comes_from_its_class() -> None:
    """The names the API's schema offers are the registry's, and what TrainSpec and the
    generation checks know of a family its class says (common.family_names)."""
    from pydantic import ValidationError

    from common.family_names import ALIASES, CLASSES, FamilyName
    from common.ml.families import TextFamily, TextToImageFamily, families_that
    from common.train_spec import TrainSpec, generation_kind, takes_prompts

    assert typing.get_args(FamilyName) == (*CLASSES, *ALIASES) == tuple(FAMILIES)
    takers = families_that(lambda f: f.ADAPTERS)
    assert "lm" in takers
    for name, family in FAMILIES.items():
        assert set(family.PRETRAINED_FIELDS) <= set(family.Config.model_fields), name
        prompted = isinstance(family, TextFamily | TextToImageFamily)
        assert takes_prompts(name) == prompted, name
        assert (generation_kind(name) == "text-to-image") == isinstance(family,
                                                                         TextToImageFamily)
        if not family.ADAPTERS:
            with pytest.raises(ValidationError, match=f"adapter: only the {takers[0]}"):
                TrainSpec(family=name, adapter={"r": 2})
    assert families_that(lambda f: f.supports_gradient_checkpointing) == ["lm"]


@pytest.mark.parametrize("family", ["vae", "gan", "lstm", "lm", "gpt"])
def test_defaults_are_valid(family: str) -> None:
    assert validate_model_config(family, {}) == []


def test_config_lists_every_bad_field(tmp_path: Path) -> None:
    problems = validate_model_config("gpt", {"n_layer": 2.5, "n_head": "two", "dropout": 1.5,
                                             "wat": 1, "vocab_size": 3})
    assert problems == [
        "config.wat: unknown field for arch 'gpt2' (neither genq's nor GPT2Config's)",
        "config.n_layer: must be int, got 2.5", "config.n_head: must be int, got 'two'",
        "config.dropout: must be in [0, 1)", "config.vocab_size: must be in [257, 1000000]"]
    assert validate_model_config("gpt", {"n_embd": 30, "n_head": 4}) == [
        "config: transformers cannot build this gpt2 model: `embed_dim` must be divisible by "
        "num_heads (got `embed_dim`: 30 and `num_heads`: 4)."]
    assert validate_model_config("lm", {"pretrained": str(tmp_path), "n_layer": 1}) == [
        "config.pretrained: must be a local directory holding a transformers model "
        "(config.json not found)",
        "config.n_layer: the pretrained model's own config sets it: remove it (or train from "
        "a config)"]
    assert validate_model_config("vae", {"conditional": 1, "latent": 2.5}) == [
        "config.conditional: must be bool or null, got 1",
        "config.latent: must be int, got 2.5"]
    assert validate_model_config("nope", {})[0].startswith("family:")


def test_lm_config_names_each_bad_arch_field() -> None:
    """Any transformers architecture: its own fields pass through, checked by transformers."""
    llama = {"arch": "llama", "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 64}
    assert validate_model_config("lm", llama) == []
    assert validate_model_config("lm", {**llama, "hiden_size": 32, "num_attention_heads": "x",
                                        "dropout": 0.1, "eos_token_id": 3}) == [
        "config.hiden_size: unknown field for arch 'llama' (neither genq's nor LlamaConfig's; "
        "did you mean hidden_size?)",
        "config.num_attention_heads: must be int, got 'x'",
        "config.dropout: gpt2 only: give llama's own dropout fields",
        "config.eos_token_id: set from the tokenizer trained on the data"]
    assert validate_model_config("lm", {**llama, "num_hidden_layers": 0}) == [
        "config.num_hidden_layers: must be in [1, 1024]"]
    assert validate_model_config("lm", {"arch": "lama"}) == [
        "config.arch: 'lama' is not a transformers architecture with a causal-LM head "
        "(did you mean llama, mllama, llama4?)"]
    assert validate_model_config("lm", {**llama, "hidden_size": 48}) == []  # 2 heads divide it
    assert validate_model_config("lm", {**llama, "hidden_size": 30, "num_attention_heads": 4}) == [
        "config: transformers cannot build this llama model: ValueError: The hidden size (30) "
        "is not a multiple of the number of attention heads (4)."]
    assert validate_model_config("lm", {"hidden_size": 64, "n_embd": 64}) == [
        "config.hidden_size: the same field as n_embd: give one"]
    assert validate_model_config("lm", {"pretrained": "org/name", "revision": "v1.0"}) == []
    assert validate_model_config("lm", {"pretrained": "bad id!", "revision": "main",
                                        "commit": "abc"}) == [
        "config.pretrained: 'bad id!' is neither a folder inside GENQ_PRETRAINED_ROOT nor a "
        "hub id org/name",
        "config.commit: set by the worker (the commit the revision resolved to); pin one with "
        "config.revision"]
    assert validate_model_config("lm", {"revision": "main"}) == [
        "config.revision: only with a hub id in config.pretrained"]


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


def test_image_shapes_are_bounded(tmp_path: Path) -> None:
    """An empty side or a side past the image families' bound is a DataError naming the file,
    found from the array's shape or the PNG's header before any pixels are decoded."""
    from PIL import Image

    from common.errors import DataError
    from common.ml.data import MAX_SIDE, load_data

    np.savez(tmp_path / "empty.npz", images=np.zeros((2, 0, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="every size >= 1"):
        load_data({"path": str(tmp_path / "empty.npz")}, "image")
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.new("L", (MAX_SIDE + 1, 1)).save(folder / "wide.png")
    with pytest.raises(DataError, match="wide.png is 4097x1"):
        load_data({"path": str(folder)}, "image")


def zeros_npz(path: Path, shape: tuple[int, ...], member: str = "images.npy") -> Path:
    """An .npz whose one array is uint8 zeros of `shape`: kilobytes compressed, any size
    decoded; written a megabyte at a time, so the test never holds it."""
    import zipfile

    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
              "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, \
            z.open(member, "w", force_zip64=True) as out:
        np.lib.format.write_array_header_1_0(out, header)
        left, block = int(np.prod(shape)), bytes(1 << 20)
        while left:
            out.write(block[:min(left, len(block))])
            left -= min(left, len(block))
    return path


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """GENQ_MAX_DECODED_BYTES at 1 MB."""
    from common.config import get_settings

    monkeypatch.setenv("GENQ_MAX_DECODED_BYTES", str(1 << 20))
    get_settings.cache_clear()
    yield 1 << 20
    get_settings.cache_clear()


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("decoded past the budget check")


def test_an_npz_over_the_decoded_budget_is_refused_from_its_header(
        tmp_path: Path, small_budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 26: a small .npz of zeros that decodes past GENQ_MAX_DECODED_BYTES, or one whose
    header claims a huge shape it does not hold, is refused before any array is decoded."""
    zeros = zeros_npz(tmp_path / "zeros.npz", (300, 64, 64))  # 4.9 MB as float32
    assert zeros.stat().st_size < 50_000
    liar = tmp_path / "liar.npz"
    import zipfile

    with zipfile.ZipFile(liar, "w") as z:  # a header for 10**9 images and 3 bytes of data
        z.writestr("images.npy", _npy_header((10**9, 64, 64)) + b"abc")
    monkeypatch.setattr(np, "load", _never)
    for path in (zeros, liar):
        with pytest.raises(DataError) as loading:
            load_data({"path": str(path)}, "image")
        for problems in (validate_data({"path": str(path)}, "image"), loading.value.problems):
            assert len(problems) == 1 and "GENQ_MAX_DECODED_BYTES (1,048,576)" in problems[0], \
                problems


def _npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False,
                                               "shape": shape})
    return out.getvalue()


def test_an_npz_within_the_budget_is_checked_a_chunk_at_a_time(tmp_path: Path) -> None:
    """Validation reads the values in chunks (a nan anywhere is found) without np.load."""
    images = np.zeros((40, 8, 8))
    images[39, 7, 7] = np.nan
    np.savez(tmp_path / "nan.npz", images=images, labels=np.arange(40) - 1)
    assert validate_data({"path": str(tmp_path / "nan.npz")}, "image") == [
        "data.path: 'images' contains nan or inf", "data.path: 'labels' must be >= 0"]


def test_pngs_over_the_decoded_budget_are_refused_from_their_headers(
        tmp_path: Path, small_budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each PNG within the budget but all of them past it, or one PNG alone past it: refused
    from the headers, before any pixels are decoded."""
    from PIL import Image

    from common.ml import data

    many, one = tmp_path / "many", tmp_path / "one"
    many.mkdir()
    one.mkdir()
    for i in range(12):  # 128x128 RGB: 196,608 bytes as float32 each, 2.4 MB together
        Image.new("RGB", (128, 128)).save(many / f"{i}.png")
    Image.new("RGBA", (1024, 1024)).save(one / "big.png")  # 16.8 MB as float32
    monkeypatch.setattr(data, "_read_image", _never)
    problems = validate_data({"path": str(many)}, "image")
    assert problems == ["data.path: many decodes to 2,359,296 bytes (12 images as float32), "
                        "more than GENQ_MAX_DECODED_BYTES (1,048,576)"]
    problems = validate_data({"path": str(one)}, "image")
    assert problems == ["data.path: big.png decodes to 16,777,216 bytes (1024x1024 RGBA), "
                        "more than GENQ_MAX_DECODED_BYTES (1,048,576)"]
