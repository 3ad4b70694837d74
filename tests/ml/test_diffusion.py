"""The diffusion family in-process: captions, the recipe, drawing for prompts, config
problems, and a Stable Diffusion pipeline folder (tiny, random, built from configs)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.config import get_settings
from common.gen_params import GenParams
from common.ml.checkpoint import LoadedModel, load_model
from common.ml.data import load_data
from common.ml.families import TextToImageFamily, get_family, validate_model_config
from common.ml.generate import GenOutput, GenRequest, generate
from common.ml.train import TrainHooks, TrainOutcome, run_training
from common.train_spec import TrainSpec


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainOutcome:
    from tests.ml.conftest import TINY

    spec = {"family": "diffusion", "config": dict(TINY["diffusion"]), "steps": 40, "lr": 3e-3,
            "batch_size": 16, "checkpoint_every": 1000}
    return run_training(spec, tmp_path_factory.mktemp("diffusion"), hooks=TrainHooks())


def draw(loaded: LoadedModel, *requests: GenRequest) -> dict[str, GenOutput]:
    out: list[GenOutput] = []
    generate(loaded, list(requests), on_outputs=out.extend)
    return {o.key: o for o in out}


def test_digits_are_captioned_by_their_word() -> None:
    data = load_data({"builtin": "digits"}, "image")
    assert data.captions is not None and len(data.captions) == len(data.images)
    assert data.captions[:3] == ["a handwritten digit zero", "a handwritten digit one",
                                 "a handwritten digit two"]
    assert data.labels is not None and data.captions[7].endswith(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
         "nine"][int(data.labels[7])])


def test_the_recipe_fills_a_spec_that_names_no_config_and_no_steps() -> None:
    recipe = get_family("diffusion").RECIPE
    bare = TrainSpec(family="diffusion")
    assert bare.steps == recipe["steps"] and bare.batch_size == recipe["batch_size"]
    assert TrainSpec(family="diffusion", batch_size=8).batch_size == 8  # given wins
    assert TrainSpec(family="diffusion", steps=5).batch_size == 16  # steps given: no recipe
    sized = TrainSpec(family="diffusion", config={"block_channels": [16, 32]})
    assert sized.steps == 200 and sized.batch_size == 16
    assert TrainSpec(family="vae").steps == 200  # other families have no recipe


def test_trains_checkpoints_and_draws_for_prompts(trained: TrainOutcome) -> None:
    kinds = {a.kind: a.path for a in trained.artifacts}
    grid = Image.open(kinds["image_grid"])
    assert grid.height > grid.width  # a row of 8 for each of the ten validation prompts
    loaded = load_model(trained.checkpoint)
    assert loaded.config.validation_prompts[0] == "a handwritten digit zero"
    assert loaded.model.ema is not None  # ema_decay: generation draws with the EMA weights
    three = GenRequest(key="a", prompt="a handwritten digit three", n=2, seed=5)
    out = draw(loaded, three, GenRequest(key="b", prompt="a handwritten digit one"))
    assert len(out["a"].images or []) == 2 and len(out["b"].images or []) == 1
    again = draw(loaded, three)["a"]
    assert again.images == out["a"].images  # seeded: the same pictures
    image = Image.open(io.BytesIO((out["a"].images or [])[0]))
    assert image.format == "PNG" and image.size == (64, 64)  # 8x8, upscaled by 8
    sized = draw(loaded, GenRequest(key="s", prompt="a handwritten digit three", seed=5,
                                    size="24x16"))["s"]
    assert Image.open(io.BytesIO((sized.images or [])[0])).size == (24, 16)


def test_seeded_requests_share_a_draw_only_when_their_prompts_are_equal(
        trained: TrainOutcome) -> None:
    """Identical seeded requests are drawn once; the prompt is part of what is identical
    (it once was not, and ten digits asked with one seed all came out as the first)."""
    from common.ml.generate import _units

    loaded = load_model(trained.checkpoint)
    requests = [GenRequest(key=k, prompt=p, seed=5) for k, p in
                (("a", "a handwritten digit one"), ("b", "a handwritten digit two"),
                 ("c", "a handwritten digit one"))]
    units = _units(loaded, get_family("diffusion"), requests)
    assert [[r.key for r in u.requests] for u in units] == [["a", "c"], ["b"]]


def test_every_drawing_parameter_reaches_the_unet(trained: TrainOutcome,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What the UNet is asked (a barely trained model's pictures saturate, so the test
    watches its calls): the steps, the guided batch and the negative prompt's context."""
    loaded = load_model(trained.checkpoint)
    module = get_family("diffusion")
    assert isinstance(module, TextToImageFamily)
    unet = loaded.model.ema.module  # ema_decay is set: generation draws with the EMA weights
    calls: list[tuple[int, torch.Tensor]] = []
    forward = unet.forward

    def watched(x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                **kw: object) -> object:
        calls.append((len(x), encoder_hidden_states.detach().clone()))
        return forward(x, t, encoder_hidden_states=encoder_hidden_states, **kw)

    monkeypatch.setattr(unet, "forward", watched)

    def images(prompt: str = "a handwritten digit five", **params: object) -> torch.Tensor:
        calls.clear()
        params = {"guidance_scale": 1.0, **params}
        torch.manual_seed(0)
        return module.images_for(loaded.model, loaded.tokenizer, loaded.config, [prompt] * 3,
                                 GenParams.model_validate(params))

    plain = images()
    assert plain.shape == (3, 1, 8, 8)
    assert float(plain.min()) >= 0 and float(plain.max()) <= 1
    assert torch.equal(images(), plain)
    assert [n for n, _ in calls] == [3] * loaded.config.sample_steps  # guidance 1: one pass
    five = calls[0][1]
    images("a handwritten digit one")
    assert not torch.equal(calls[0][1], five)
    images(steps=5)
    assert len(calls) == 5
    images(guidance_scale=3.0)
    assert calls[0][0] == 6 and torch.equal(calls[0][1][3:], five)  # (unconditional, prompt)
    empty = calls[0][1][:3]
    images(guidance_scale=3.0, negative_prompt="a handwritten digit one")
    assert not torch.equal(calls[0][1][:3], empty) and torch.equal(calls[0][1][3:], five)


def test_a_request_the_model_cannot_honour_fails_by_its_field(trained: TrainOutcome) -> None:
    from common.errors import InvalidRequests

    loaded = load_model(trained.checkpoint)
    with pytest.raises(InvalidRequests) as bad:
        draw(loaded, GenRequest(key="x", prompt="a seven", label=7))
    assert bad.value.problems["x"] == ["label: a text-to-image model draws for a prompt, "
                                       "not a label"]


@pytest.mark.parametrize(("config", "problem"), [
    ({"block_channels": [12, 16], "attention_levels": [False, True]},
     "config.block_channels: each must be in [1, 4096] and a multiple of norm_groups (8) and "
     "attention_head_dim (8), got 12"),
    ({"attention_levels": [True]}, "config.attention_levels: give one per entry of "
                                   "block_channels (2)"),
    ({"attention_levels": [False, False], "text_embedding": False},
     "config.attention_levels: the text must reach the UNet: let a level attend to it, or keep "
     "text_embedding on"),
    ({"text_width": 30, "text_heads": 4},
     "config.text_width: must be a multiple of text_heads (4)"),
    ({"sampler": "euler"}, "config.sampler: must be 'dpm-solver' or 'ddim'"),
    ({"pretrained": "org/pipe", "block_channels": [32]},
     "config.block_channels: a pretrained pipeline brings its own (give pretrained or sizes, "
     "not both)"),
    ({"pretrained": "not a hub id"}, "config.pretrained: 'not a hub id' is neither a folder "
                                     "inside GENQ_PRETRAINED_ROOT nor a hub id org/name"),
])
def test_config_problems_name_their_field(config: dict, problem: str) -> None:
    assert validate_model_config("diffusion", config) == [problem]


# ------------------------------------------------------------ a Stable Diffusion pipeline


def save_tiny_pipeline(folder: Path) -> None:
    """A tiny random Stable Diffusion pipeline saved with diffusers' own save_pretrained;
    its tokenizer is a word-level one (a CLIP BPE tokenizer needs vocabulary files the hub
    would provide)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from common.ml.families.diffusion import _fit_tokenizer

    torch.manual_seed(0)
    tokenizer = _fit_tokenizer([f"a handwritten digit {w}" for w in ("one", "two")], 8)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                          block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                          down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16),
        text_encoder=CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=8, pad_token_id=0, bos_token_id=0,
            eos_token_id=2)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
            norm_num_groups=4, attention_head_dim=4, cross_attention_dim=16),
        scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


@pytest.fixture
def pipeline_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The tiny pipeline inside GENQ_PRETRAINED_ROOT, as `tiny-sd`."""
    monkeypatch.setenv("GENQ_PRETRAINED_ROOT", str(tmp_path))
    get_settings.cache_clear()
    save_tiny_pipeline(tmp_path / "tiny-sd")
    yield tmp_path / "tiny-sd"
    get_settings.cache_clear()


def test_a_pipeline_folder_fine_tunes_in_latent_space_and_draws(pipeline_dir: Path,
                                                                  tmp_path: Path) -> None:
    spec = {"family": "diffusion", "config": {"pretrained": "tiny-sd", "sample_steps": 2},
            "steps": 2, "batch_size": 4, "checkpoint_every": 1000}
    outcome = run_training(spec, tmp_path / "run", hooks=TrainHooks())
    meta = json.loads((outcome.checkpoint / "config.json").read_text())
    assert meta["source"] == {"local_dir": str(pipeline_dir)}
    assert meta["arch"]["vae"]["latent_channels"] == 4  # rebuilt without the folder
    loaded = load_model(outcome.checkpoint)
    assert loaded.model.vae is not None
    # only the UNet trained: the VAE and the pipeline's text encoder are as saved
    from diffusers import AutoencoderKL

    saved_vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae")
    for name, tensor in saved_vae.state_dict().items():
        assert torch.equal(loaded.model.vae.state_dict()[name], tensor), name
    out = draw(loaded, GenRequest(key="a", prompt="a handwritten digit two", seed=1))["a"]
    image = Image.open(io.BytesIO((out.images or [])[0]))
    assert image.mode == "RGB" and image.size == (64, 64)  # 8x8 latents x 2 (VAE), upscaled


def test_a_submitted_pipeline_must_be_a_pipeline_folder(pipeline_dir: Path) -> None:
    (pipeline_dir.parent / "plain").mkdir()
    with pytest.raises(ValueError, match="model_index.json not found"):
        TrainSpec(family="diffusion", config={"pretrained": "plain"})


def test_a_pipeline_keeps_its_text_encoder_and_vae_frozen(pipeline_dir: Path) -> None:
    """Only the UNet of a pretrained pipeline computes gradients: the text encoder is as
    frozen as the VAE (it once computed gradients no optimizer stepped)."""
    module = get_family("diffusion")
    spec = TrainSpec(family="diffusion", config={"pretrained": "tiny-sd"})
    cfg, tokenizer = module.prepare(module.Config(**spec.config), load_data({"builtin": "digits"},
                                                                           "image"))
    model = module.build_model(cfg, tokenizer)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert all(p.requires_grad for p in model.unet.parameters())


# ------------------------------------------------------------ a LoRA adapter on the UNet

UNET_LORA = {"r": 4, "alpha": 8, "dropout": 0.1}


def lora_spec(**extra: object) -> dict:
    return {"family": "diffusion", "config": {"pretrained": "tiny-sd", "sample_steps": 2},
            "steps": 6, "batch_size": 4, "grad_accum": 2, "warmup_steps": 2, "lr": 1e-2,
            "weight_decay": 0.1, "checkpoint_every": 2, "eval_every": 2,
            "adapter": dict(UNET_LORA), **extra}


def test_a_unet_lora_resumes_exactly_and_checkpoints_the_adapter_alone(
        pipeline_dir: Path, tmp_path: Path) -> None:
    """Stop at step 3 and resume: bitwise the adapter of an uninterrupted run. Each
    checkpoint holds peft's adapter files and the training state, not the pipeline; only
    the UNet's attention projections are adapted, and the pipeline's weights stay as saved."""
    from safetensors.torch import load_file

    from common.ml.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from common.ml.checkpoint import MODEL_FILE
    from tests.ml.conftest import straight_and_resumed

    spec = lora_spec()
    straight, _, resumed = straight_and_resumed(spec, 3, tmp_path)
    assert resumed.step == 6
    a = load_file(straight.checkpoint / ADAPTER_WEIGHTS)
    b = load_file(resumed.checkpoint / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k), "B moved off 0"
    # the attention projections of the UNet alone (the VAE's attention is named alike)
    adapted = {k.split(".lora_")[0] for k in a}
    assert adapted and all(k.startswith("base_model.model.unet.") for k in adapted), adapted
    assert {k.rsplit(".", 1)[-1] for k in adapted} == {"to_q", "to_k", "to_v", "0"}

    files = {f.name for f in straight.checkpoint.iterdir()}
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, "config.json", "state.pt"} <= files
    assert MODEL_FILE not in files
    meta = json.loads((straight.checkpoint / "config.json").read_text())
    assert meta["adapter"] == {**UNET_LORA, "method": "lora", "target_modules": None,
                               "merge": False}
    assert meta["source"] == {"local_dir": str(pipeline_dir)} and "base" not in meta
    unet_bytes = (pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (straight.checkpoint / ADAPTER_WEIGHTS).stat().st_size < unet_bytes * 0.5

    loaded = load_model(straight.checkpoint)  # the pipeline, then the adapter
    from diffusers import UNet2DConditionModel

    saved = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet").state_dict()
    base = loaded.model.get_base_model().unet.state_dict()
    for name, tensor in saved.items():
        here = base.get(name, base.get(name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")))
        assert here is not None and torch.equal(here, tensor), name
    out = draw(loaded, GenRequest(key="a", prompt="a handwritten digit two", seed=1))["a"]
    assert Image.open(io.BytesIO((out.images or [])[0])).size == (64, 64)


def test_a_merged_unet_lora_draws_as_the_pipeline_with_its_adapter(pipeline_dir: Path,
                                                                    tmp_path: Path) -> None:
    from common.ml.checkpoint import MODEL_FILE

    spec = lora_spec(steps=3, eval_every=None, checkpoint_every=1000,
                     adapter={**UNET_LORA, "dropout": 0.0, "merge": True,
                              "target_modules": "all-linear"})
    outcome = run_training(spec, tmp_path, hooks=TrainHooks())
    assert outcome.merged is not None and (outcome.merged / MODEL_FILE).is_file()
    assert "adapter" not in json.loads((outcome.merged / "config.json").read_text())
    module = get_family("diffusion")
    assert isinstance(module, TextToImageFamily)
    pictures = []
    for path in (outcome.checkpoint, outcome.merged):
        loaded = load_model(path)
        torch.manual_seed(3)
        pictures.append(module.images_for(loaded.model, loaded.tokenizer, loaded.config,
                                          ["a handwritten digit one"] * 2, GenParams()))
    torch.testing.assert_close(pictures[0], pictures[1], rtol=1e-4, atol=1e-4)


def test_unet_lora_problems_name_their_field(pipeline_dir: Path, tmp_path: Path) -> None:
    from common.errors import InvalidTrainSpec

    def problem(config: dict) -> str:
        with pytest.raises(ValueError) as e:
            TrainSpec.model_validate({"family": "diffusion", "config": config,
                                      "adapter": {}})
        return str(e.value)

    assert ("adapter: the diffusion family trains an adapter over a pretrained pipeline's "
            "UNet only (give config.pretrained)") in problem({})
    assert "config.ema_decay: not with an adapter" in problem({"pretrained": "tiny-sd",
                                                               "ema_decay": 0.9})
    spec = lora_spec(adapter={"target_modules": ["q_proj"]})  # the text encoder's names
    with pytest.raises(InvalidTrainSpec, match=r"^adapter\.target_modules: no module of the "
                                               r"UNet matches \['q_proj'\]"):
        run_training(spec, tmp_path, hooks=TrainHooks())


def test_a_hub_pipeline_fetches_only_what_the_family_loads() -> None:
    """The files of stable-diffusion-v1-5 on the hub, through huggingface_hub's own filter
    (the one snapshot_download applies): configs and safetensors of the five folders, not
    the fp16 and non-EMA variants, pickles, the safety checker or the root's single files."""
    from huggingface_hub.utils import filter_repo_objects

    from common.ml.pretrained import PIPELINE_FILES, PIPELINE_VARIANTS

    wanted = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
              "text_encoder/model.safetensors", "tokenizer/merges.txt",
              "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
              "tokenizer/vocab.json", "unet/config.json",
              "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors"]
    others = [".gitattributes", "README.md", "feature_extractor/preprocessor_config.json",
              "safety_checker/config.json", "safety_checker/model.safetensors",
              "safety_checker/model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
              "text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.bin",
              "unet/diffusion_pytorch_model.fp16.safetensors",
              "unet/diffusion_pytorch_model.non_ema.safetensors",
              "unet/diffusion_pytorch_model.non_ema.bin",
              "vae/diffusion_pytorch_model.fp16.safetensors", "v1-5-pruned.safetensors",
              "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "v1-inference.yaml"]
    fetched = filter_repo_objects(sorted(wanted + others), allow_patterns=PIPELINE_FILES,
                                  ignore_patterns=PIPELINE_VARIANTS)
    assert sorted(fetched) == sorted(wanted)
