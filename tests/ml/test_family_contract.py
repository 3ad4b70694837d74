"""The family contract: every registered family implements it, and its config says what is wrong."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from common.gen_params import GenParams
from common.ml.data import ImageData, TextData
from common.ml.families import (
    FAMILIES,
    Family,
    FamilyConfig,
    ImageFamily,
    TextFamily,
    TextToImageFamily,
    get_family,
    validate_model_config,
)

KINDS: tuple[type[Family], ...] = (TextFamily, ImageFamily, TextToImageFamily)
TINY = {
    "vae": {"hidden": 16, "latent": 2, "conditional": True},
    "gan": {"hidden": 16, "latent": 2, "conditional": True},
    "lstm": {"n_embd": 8, "hidden": 16},
    "gpt": {"vocab_size": 300, "n_positions": 16, "n_embd": 16, "n_layer": 1, "n_head": 2},
    "lm": {"arch": "llama", "vocab_size": 300, "hidden_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 32},
    "diffusion": {"block_channels": [8, 16], "norm_groups": 4, "attention_head_dim": 4,
                  "text_width": 8, "sample_steps": 2},
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_implements_its_kind(name: str) -> None:
    family = get_family(name)
    (kind,) = [k for k in KINDS if isinstance(family, k)]
    assert family.KIND == kind.KIND and not inspect.isabstract(type(family))
    assert issubclass(family.Config, FamilyConfig) and family.PHASES
    for method in ("prepare", "build_model", "architecture", "phase_params", "loss",
                   *kind.__abstractmethods__):
        base = list(inspect.signature(getattr(kind, method)).parameters)
        assert list(inspect.signature(getattr(type(family), method)).parameters) == base, method


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_trains_one_step_and_generates(name: str, text_file: Path) -> None:
    """prepare -> build_model -> loss per phase -> sample/complete, on a tiny model."""
    family = get_family(name)
    torch.manual_seed(0)
    if isinstance(family, ImageFamily):
        images = torch.rand(4, 1, 8, 8)
        cfg, tokenizer = family.prepare(family.Config(**TINY[name]),
                                        ImageData(images, torch.arange(4) % 2, "test"))
        assert tokenizer is None and (cfg.channels, cfg.n_classes) == (1, 2)
        batch: tuple[torch.Tensor, torch.Tensor | None] = (images, torch.arange(4) % 2)
    elif isinstance(family, TextToImageFamily):
        images = torch.rand(4, 1, 8, 8)
        captions = ["a seven", "a one", "a seven", "a one"]
        cfg, tokenizer = family.prepare(family.Config(**TINY[name]),
                                        ImageData(images, None, "test", captions))
        assert cfg.validation_prompts == ["a seven", "a one"] and cfg.vocab_size == 5
        model = family.build_model(cfg, tokenizer)
        batch = (images, family.encode_captions(tokenizer, captions, family.caption_length(model)))
    else:
        cfg, tokenizer = family.prepare(family.Config(**TINY[name]),
                                        TextData(text_file.read_text()[:5000], "test"))
        ids = torch.tensor([family.encode(tokenizer, "def f(x): return x")[:8]])
        batch = (ids[:, :-1], ids[:, 1:])
    model = family.build_model(cfg, tokenizer)
    for phase in family.PHASES:
        loss, extras = family.loss(model, batch, phase)
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert all(isinstance(v, torch.Tensor) for v in extras.values())
        assert family.phase_params(model, phase)
    if isinstance(family, ImageFamily):
        assert family.sample_images(model, 3, torch.tensor([0, 1, 0])).shape == (3, 1, 8, 8)
    elif isinstance(family, TextToImageFamily):
        images = family.images_for(model, tokenizer, cfg, ["a one"] * 3, GenParams())
        assert images.shape == (3, 1, 8, 8)
    else:
        [[completion]] = family.complete(model, tokenizer, [[1, 2]],
                                         GenParams(max_tokens=3, temperature=0), 1)
        assert completion.tokens_out <= 3


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_config_error_lists_every_field(name: str) -> None:
    """A value of the wrong type in every field, and an unknown one: each problem is named."""
    fields = list(get_family(name).Config.model_fields)
    if "arch" in fields:  # lm: other fields are the arch's, so a broken arch hides them
        fields.remove("arch")
    problems = validate_model_config(name, {**dict.fromkeys(fields, {}), "bogus": 1})
    assert [p.split(":")[0] for p in problems] == ["config.bogus"] + [f"config.{f}"
                                                                      for f in fields]
    assert problems[0].startswith("config.bogus: unknown field")
    literal = re.compile(r": must be '?[\w-]+'?(, '?[\w-]+'?)* or '?[\w-]+'?$")
    assert all(p.endswith(", got {}") or literal.search(p) for p in problems[1:]), problems


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_config_bounds_name_each_field(name: str) -> None:
    """Every bounded field reports its bound when given a value outside it."""
    config_type = get_family(name).Config
    below = {}
    for field, info in config_type.model_fields.items():
        for bound in info.metadata:
            if hasattr(bound, "ge"):
                below[field] = bound.ge - 1
    assert below, "every family bounds some field"
    problems = validate_model_config(name, below)
    assert [p.split(":")[0] for p in problems] == [f"config.{f}" for f in below]
    assert all(": must be >= " in p or ": must be in [" in p for p in problems), problems
    assert validate_model_config("lstm", {"dropout": 1.0}) == ["config.dropout: must be in [0, 1)"]
    assert validate_model_config("vae", {"channels": 2}) == ["config.channels: must be 1, 3 or 4"]


def test_pretrained_is_checked_when_submitted_not_when_read_back(tmp_path: Path) -> None:
    """A checkpoint made from a pretrained directory loads after that directory is gone."""
    missing = str(tmp_path / "gone")
    assert validate_model_config("gpt", {"pretrained": missing}) == [
        "config.pretrained: must be a local directory holding a transformers model "
        "(config.json not found)"]
    assert get_family("gpt").Config.model_validate({"pretrained": missing}).pretrained == missing


def test_config_is_stored_as_a_plain_dict() -> None:
    cfg = get_family("vae").Config(hidden=16, beta=1)
    assert cfg.model_dump() == {"conditional": None, "channels": 1, "height": 8, "width": 8,
                                "n_classes": 0, "hidden": 16, "latent": 8, "beta": 1.0}
    assert get_family("vae").Config.model_validate(cfg.model_dump()) == cfg
