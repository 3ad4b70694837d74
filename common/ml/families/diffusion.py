"""Text to image: a diffusers UNet2DConditionModel denoising under a transformers CLIP text
encoder, trained with DDPM (v- or epsilon prediction, caption dropout for classifier-free
guidance) and sampled with DPM-Solver or DDIM.

The text reaches the UNet through cross-attention at the `attention_levels` it names and,
with `text_embedding`, through diffusers' TextTimeEmbedding (the encoder states pooled by
attention and added to the timestep embedding, so every ResNet block sees the prompt). The
default (the recipe's) uses the second alone: on 8x8 digits it trains 3-6 times faster per
step than cross-attention and draws the prompted digit as often.

From a config, the model works in pixel space and its tokenizer is a word-level one fitted
on the captions (or a CLIP tokenizer from a folder or hub id, `config.tokenizer`). With
`config.pretrained`, a Stable Diffusion pipeline folder or hub id (unet, vae, text_encoder,
tokenizer, scheduler) is loaded and the UNet is fine-tuned in the VAE's latent space (its
VAE and text encoder frozen): every UNet weight, or a LoRA adapter on the UNet through peft
(TrainSpec.adapter; common/ml/adapters.py wraps the whole model, targeting UNet modules only).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator

from common.errors import ConfigProblem, ModelNotFound
from common.gen_params import GenParams
from common.ml.data import ImageData, TextData
from common.ml.families.base import SUBMITTED, FamilyConfig, TextToImageFamily
from common.ml.pretrained import (
    PIPELINE_FILES,
    PIPELINE_VARIANTS,
    TOKENIZER_FILES,
    ModelSource,
    Resolved,
    check_local_or_hub,
    resolve,
    source_of,
)

PAD, UNK = "[PAD]", "[UNK]"
TOKENIZER_DIR = "tokenizer"
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# The fields that size a from-config model: a pretrained pipeline brings its own.
ARCH_FIELDS = ("block_channels", "attention_levels", "text_embedding", "layers_per_block",
               "attention_head_dim", "norm_groups", "text_width", "text_layers", "text_heads",
               "max_caption_tokens", "tokenizer", "train_timesteps", "beta_schedule",
               "prediction")
# A UNet LoRA's modules when the adapter names none: the attention projections (diffusers'
# own LoRA training script's choice)
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class DiffusionConfig(FamilyConfig):
    """A from-config model (UNet and text encoder sizes), or `pretrained` (none of those)."""

    # a Stable Diffusion pipeline: a folder in GENQ_PRETRAINED_ROOT (made absolute) or org/name
    pretrained: str | None = Field(None, max_length=1024)
    revision: str | None = Field(None, min_length=1, max_length=255,
                                 pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")  # hub ids only
    # set by the worker: the commit `revision` resolved to
    commit: str | None = Field(None, max_length=64)
    # a CLIP tokenizer for a from-config model (folder or hub id); None: fitted on the captions
    tokenizer: str | None = Field(None, max_length=1024)
    # the UNet: channels per resolution level, and which levels cross-attend to the text
    block_channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1,
                                      max_length=6)
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False], min_length=1,
                                         max_length=6)
    text_embedding: bool = True  # the pooled text joins the timestep embedding
    layers_per_block: int = Field(1, ge=1, le=8)
    attention_head_dim: int = Field(8, ge=1, le=512)
    norm_groups: int = Field(8, ge=1, le=512)
    # the text encoder (CLIPTextModel)
    text_width: int = Field(32, ge=2, le=8192)
    text_layers: int = Field(1, ge=1, le=48)
    text_heads: int = Field(2, ge=1, le=128)
    max_caption_tokens: int = Field(16, ge=2, le=512)
    # the noise schedule (DDPM) and training
    train_timesteps: int = Field(1000, ge=10, le=10_000)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    # what the UNet predicts: the velocity (stable at the noisiest steps) or the noise
    prediction: Literal["v_prediction", "epsilon"] = "v_prediction"
    caption_dropout: float = Field(0.1, ge=0, le=1)  # the empty caption, for guidance
    ema_decay: float | None = Field(None, gt=0, lt=1)  # generation uses the EMA weights
    # generation defaults (a request's steps / guidance_scale override them)
    sampler: Literal["dpm-solver", "ddim"] = "dpm-solver"
    sample_steps: int = Field(10, ge=1, le=1000)
    guidance_scale: float = Field(2.0, ge=0, le=50)
    # fitted to the data at train time
    channels: Literal[1, 3, 4] = 1
    height: int = Field(8, ge=1, le=4096)
    width: int = Field(8, ge=1, le=4096)
    vocab_size: int = Field(0, ge=0, le=1_000_000)
    validation_prompts: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("pretrained", "tokenizer")
    @classmethod
    def _local_or_hub(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or info.context != SUBMITTED:
            return value
        if info.field_name == "pretrained":
            check_local_or_hub(value, holds="model_index.json",
                               what="a diffusers pipeline directory")
        else:
            check_local_or_hub(value, holds=None, what="a tokenizer")
        return value

    @model_validator(mode="after")
    def _coherent(self, info: ValidationInfo) -> DiffusionConfig:
        if info.context != SUBMITTED:
            return self
        if self.pretrained is not None:
            given = [f for f in ARCH_FIELDS if f in self.model_fields_set]
            if given:
                raise ConfigProblem(given[0], "a pretrained pipeline brings its own (give "
                                    "pretrained or sizes, not both)")
            return self
        if len(self.attention_levels) != len(self.block_channels):
            raise ConfigProblem("attention_levels", "give one per entry of block_channels "
                                f"({len(self.block_channels)})")
        if not any(self.attention_levels) and not self.text_embedding:
            raise ConfigProblem("attention_levels", "the text must reach the UNet: let a level "
                                "attend to it, or keep text_embedding on")
        for c in self.block_channels:
            if not 1 <= c <= 4096 or c % self.norm_groups or c % self.attention_head_dim:
                raise ConfigProblem("block_channels", f"each must be in [1, 4096] and a multiple "
                                    f"of norm_groups ({self.norm_groups}) and attention_head_dim "
                                    f"({self.attention_head_dim}), got {c}")
        if self.text_width % self.text_heads:
            raise ConfigProblem("text_width",
                                f"must be a multiple of text_heads ({self.text_heads})")
        return self


class TextToImage(nn.Module):
    """The trained parts (UNet, its EMA copy, a from-config text encoder) and the frozen
    parts of a pretrained pipeline (VAE, text encoder)."""

    # diffusers and transformers modules (their configs are read as attributes)
    text_encoder: Any
    unet: Any
    vae: Any
    ema: Any
    empty_ids: torch.Tensor

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module | None,
                 noise: dict[str, Any], cfg: DiffusionConfig, empty_ids: torch.Tensor):
        from diffusers import DDPMScheduler
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        super().__init__()
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae
        self.noise = DDPMScheduler.from_config(noise)
        self.caption_dropout = cfg.caption_dropout
        self.ema = (AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
                    if cfg.ema_decay else None)
        if self.ema is not None:
            self.ema.requires_grad_(False)
        if vae is not None:  # a pretrained pipeline: only its UNet trains (phase_params)
            vae.requires_grad_(False)
            text_encoder.requires_grad_(False)
        self.register_buffer("empty_ids", empty_ids, persistent=False)  # the caption ""

    @property
    def scale(self) -> float:
        """How far each image axis shrinks into the UNet's space (the VAE's factor, or 1)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> what the UNet denoises ([-1, 1] pixels, latents)."""
        x = images * 2 - 1
        if self.vae is None:
            return x
        size = self.unet.config.sample_size * self.scale
        wanted = self.vae.config.in_channels
        if x.shape[1] == 1:  # greyscale to the VAE's channels
            x = x.expand(-1, wanted, -1, -1)
        elif x.shape[1] > wanted:  # RGBA to RGB: the alpha channel is dropped
            x = x[:, :wanted]
        if tuple(x.shape[2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        latents = self.vae.encode(x).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return (x / 2 + 0.5).clamp(0, 1)


class DiffusionFamily(TextToImageFamily[DiffusionConfig, TextToImage]):
    Config = DiffusionConfig
    PRETRAINED_FIELDS = ("pretrained", "tokenizer")
    ADAPTERS = True  # over a pretrained pipeline's UNet (adapter_problems)
    # 99-100 % of the digits it draws read as the prompted one (bench/RESULTS.md), in about
    # a minute on two CPU cores
    RECIPE = {"steps": 1500, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100,
              "weight_decay": 0.01}

    # ---------------------------------------------------------------- building

    def prepare(self, cfg: DiffusionConfig, data: TextData | ImageData) -> tuple[DiffusionConfig,
                                                                               Any]:
        """Fit the config to the captioned images; fit (or load) the tokenizer."""
        if not isinstance(data, ImageData) or data.captions is None:
            raise ValueError("data: the diffusion family trains on captioned images (the "
                             "built-in digits, or a .zip of images with a metadata.jsonl)")
        update: dict[str, Any] = {"validation_prompts": _validation_prompts(data.captions)}
        if cfg.pretrained is not None:
            found = self._resolve(cfg.pretrained, cfg.revision)
            tokenizer = self._load_clip_tokenizer(found.path / "tokenizer")
            update["commit"] = found.commit
        elif cfg.tokenizer is not None:
            path = resolve(cfg.tokenizer, None, allow=TOKENIZER_FILES).path
            tokenizer = self._load_clip_tokenizer(path)
        else:
            tokenizer = _fit_tokenizer(data.captions, cfg.max_caption_tokens)
        _, c, h, w = data.images.shape
        update |= {"channels": c, "height": h, "width": w, "vocab_size": len(tokenizer)}
        return cfg.model_copy(update=update), tokenizer

    def _resolve(self, name: str, revision: str | None) -> Resolved:
        """A pipeline's folder, or from the hub only the files the family loads."""
        return resolve(name, revision, allow=PIPELINE_FILES, ignore=PIPELINE_VARIANTS)

    def _load_clip_tokenizer(self, path: Path) -> Any:
        try:
            return self.load_tokenizer(path)
        except (OSError, ValueError) as e:
            raise ModelNotFound(f"config.pretrained: no tokenizer in {path} ({e})",
                                param="config.pretrained") from None

    def build_model(self, cfg: DiffusionConfig, tokenizer: Any = None,
                    arch: dict | None = None) -> TextToImage:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        if arch is None and cfg.pretrained is not None:
            return self._load_pipeline(cfg, tokenizer)
        arch = arch or self._arch_of(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers' notes on deprecated config keys
            unet = UNet2DConditionModel.from_config(arch["unet"])
            vae = AutoencoderKL.from_config(arch["vae"]) if arch.get("vae") else None
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(arch["text_encoder"]))
        length = arch["text_encoder"]["max_position_embeddings"]
        return TextToImage(text_encoder, unet, vae, arch["scheduler"], cfg,
                           _empty_ids(tokenizer, length))

    def train_memory(self, cfg: DiffusionConfig, batch_size: int, seq_len: int) -> int | None:
        """Per image, each UNet level: its resnet blocks down and up (about 12 values per
        channel and pixel each), and where it attends the self-attention scores (pixels
        squared, per head); plus the text encoder. None for a pretrained pipeline."""
        if cfg.pretrained is not None:
            return None
        pixels, per_image = cfg.height * cfg.width, 0
        for level, (channels, attends) in enumerate(zip(cfg.block_channels,
                                                        cfg.attention_levels, strict=False)):
            at = max(1, pixels // 4 ** level)
            per_image += 12 * (2 * cfg.layers_per_block + 1) * channels * at
            if attends:
                heads = max(1, channels // cfg.attention_head_dim)
                per_image += 2 * heads * at * (at + cfg.max_caption_tokens) + 8 * channels * at
        per_image += 16 * cfg.max_caption_tokens * cfg.text_width * cfg.text_layers
        return batch_size * per_image * 4

    def _arch_of(self, cfg: DiffusionConfig) -> dict[str, Any]:
        """The diffusers and transformers configs a from-config model is built from."""
        levels = cfg.attention_levels
        return {
            "unet": {
                "sample_size": max(cfg.height, cfg.width),  # any size is taken, square or not
                "in_channels": cfg.channels,
                "out_channels": cfg.channels, "block_out_channels": list(cfg.block_channels),
                "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D"
                                     for a in levels],
                "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D"
                                   for a in reversed(levels)],
                "mid_block_type": ("UNetMidBlock2DCrossAttn" if any(levels)
                                   else "UNetMidBlock2D"),
                "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_groups,
                "attention_head_dim": cfg.attention_head_dim,
                "cross_attention_dim": cfg.text_width,
                **({"addition_embed_type": "text",
                    "addition_embed_type_num_heads": cfg.text_heads} if cfg.text_embedding
                   else {}),
            },
            "text_encoder": {
                # 3 at least: an unfitted one (a size check at submit) still holds eos_token_id
                "vocab_size": max(cfg.vocab_size, 3), "hidden_size": cfg.text_width,
                "intermediate_size": 4 * cfg.text_width, "num_hidden_layers": cfg.text_layers,
                "num_attention_heads": cfg.text_heads,
                "max_position_embeddings": cfg.max_caption_tokens,
                "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 2,
            },
            "scheduler": {"num_train_timesteps": cfg.train_timesteps,
                          "beta_schedule": cfg.beta_schedule, "prediction_type": cfg.prediction},
            "vae": None,
        }

    def _load_pipeline(self, cfg: DiffusionConfig, tokenizer: Any) -> TextToImage:
        """The UNet, VAE and text encoder of a Stable Diffusion pipeline folder."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        assert cfg.pretrained is not None
        root = self._resolve(cfg.pretrained, cfg.commit or cfg.revision).path
        missing = [p for p in PIPELINE_PARTS if not (root / p).is_dir()]
        if missing:
            raise ModelNotFound(f"config.pretrained: {cfg.pretrained} is not a Stable Diffusion "
                                f"pipeline (no {', '.join(missing)})", param="config.pretrained")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True)
            vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True)
            noise = DDPMScheduler.from_pretrained(root / "scheduler").config
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True)
        length = text_encoder.config.max_position_embeddings
        return TextToImage(text_encoder, unet, vae, dict(noise), cfg,
                           _empty_ids(tokenizer, length))

    def architecture(self, model: TextToImage) -> dict:
        """The configs that rebuild the model without its source folder."""
        return {"unet": dict(model.unet.config),
                "text_encoder": model.text_encoder.config.to_dict(),
                "vae": dict(model.vae.config) if model.vae is not None else None,
                "scheduler": dict(model.noise.config)}

    def source(self, cfg: DiffusionConfig) -> ModelSource | None:
        return source_of(cfg.pretrained, cfg.revision, cfg.commit)

    def phase_params(self, model: TextToImage, phase: str) -> list[nn.Parameter]:
        """The UNet; the text encoder too when it was built from a config (a pretrained
        pipeline's CLIP encoder stays frozen, as Stable Diffusion fine-tuning does). Under
        a LoRA adapter the training loop keeps only the adapter's (requires_grad)."""
        params = list(model.unet.parameters())
        if model.vae is None:
            params += list(model.text_encoder.parameters())
        return params

    def adapter_problems(self, cfg: DiffusionConfig) -> list[str]:
        """A UNet LoRA adapts a pretrained pipeline: over a from-config model's random
        weights it would learn next to nothing; the EMA copy averages a whole UNet."""
        problems = []
        if cfg.pretrained is None:
            problems.append("adapter: the diffusion family trains an adapter over a pretrained "
                            "pipeline's UNet only (give config.pretrained)")
        if cfg.ema_decay is not None:
            problems.append("config.ema_decay: not with an adapter (generation uses the "
                            "adapter's own weights)")
        return problems

    def adapter_targets(self, model: TextToImage,
                        names: list[str] | str | None) -> list[str] | str | None:
        """The full names of the UNet's modules the adapter wraps (peft would also match the
        VAE's attention, named alike): those ending in one of `names` (a dotted suffix, as
        peft matches), every nn.Linear for "all-linear", the attention projections for None."""
        wanted = UNET_LORA_TARGETS if names is None else names
        found = [f"unet.{name}" for name, module in model.unet.named_modules()
                 if (isinstance(module, nn.Linear) if wanted == "all-linear" else
                     any(name == t or name.endswith(f".{t}") for t in wanted))]
        if not found:
            raise ValueError(f"no module of the UNet matches {wanted}")
        return found

    def after_step(self, model: TextToImage) -> None:
        if model.ema is not None:
            model.ema.update_parameters(model.unet)

    # ---------------------------------------------------------------- tokens

    def encode_captions(self, tokenizer: Any, captions: list[str], length: int) -> torch.Tensor:
        """(N, length) token ids, padded and cut as the text encoder takes them."""
        return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids

    def caption_length(self, model: TextToImage) -> int:
        return int(model.text_encoder.config.max_position_embeddings)

    def save_tokenizer(self, tokenizer: Any, directory: Path) -> None:
        tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))

    def load_tokenizer(self, directory: Path) -> Any:
        from transformers import AutoTokenizer

        folder = directory / TOKENIZER_DIR if (directory / TOKENIZER_DIR).is_dir() else directory
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                             trust_remote_code=False)

    # ---------------------------------------------------------------- training

    def loss(self, model: TextToImage, batch: tuple[torch.Tensor, torch.Tensor],
             phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The noise (epsilon) or the velocity (v) at a random timestep, as the noise
        schedule's prediction_type says; a caption dropped to "" at the rate
        caption_dropout, so the model also learns the unconditional score."""
        images, ids = batch
        with torch.no_grad():
            x0 = model.to_space(images)
        drop = torch.rand(len(ids), device=ids.device) < model.caption_dropout
        ids = torch.where(drop[:, None], model.empty_ids[None, :], ids)
        noise = torch.randn_like(x0)
        t = torch.randint(0, model.noise.config.num_train_timesteps, (len(x0),), device=x0.device)
        noisy = model.noise.add_noise(x0, noise, t)
        context = model.text_encoder(ids).last_hidden_state
        predicted = model.unet(noisy, t, encoder_hidden_states=context).sample
        target = (model.noise.get_velocity(x0, noise, t)
                  if model.noise.config.prediction_type == "v_prediction" else noise)
        return F.mse_loss(predicted.float(), target.float()), {}

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def images_for(self, model: TextToImage, tokenizer: Any, cfg: DiffusionConfig,
                   prompts: list[str], params: GenParams) -> torch.Tensor:
        """One image per prompt (N, C, H, W) in [0, 1], guided towards the prompt and away
        from `negative_prompt` (the empty caption when none is given)."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        device = next(model.unet.parameters()).device
        unet = model.ema.module if model.ema is not None else model.unet
        steps = params.steps or cfg.sample_steps
        guidance = cfg.guidance_scale if params.guidance_scale is None else params.guidance_scale
        pixels = model.vae is None  # in pixel space the clean image lies in [-1, 1]
        if cfg.sampler == "dpm-solver":  # thresholding keeps the estimate of x0 in range
            sampler = DPMSolverMultistepScheduler.from_config(
                model.noise.config, thresholding=pixels, sample_max_value=1.0)
        else:
            sampler = DDIMScheduler.from_config(model.noise.config, clip_sample=pixels)
        sampler.set_timesteps(steps, device=device)
        length = self.caption_length(model)
        context = self._context(model, tokenizer, prompts, length, device)
        guided = guidance != 1.0
        if guided:
            negative = [params.negative_prompt or ""] * len(prompts)
            context = torch.cat([self._context(model, tokenizer, negative, length, device),
                                 context])
        # pixel space: the data's own size; latent space: the UNet's
        shape = ((cfg.height, cfg.width) if model.vae is None
                 else (unet.config.sample_size, unet.config.sample_size))
        x = torch.randn(len(prompts), unet.config.in_channels, *shape, device=device)
        x = x * sampler.init_noise_sigma
        for t in sampler.timesteps:
            inputs = sampler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            out = unet(inputs, t, encoder_hidden_states=context).sample  # noise or velocity
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance * (cond - uncond)
            x = sampler.step(out, t, x).prev_sample
        return model.to_images(x).float()

    def _context(self, model: TextToImage, tokenizer: Any, prompts: list[str], length: int,
                 device: torch.device) -> torch.Tensor:
        ids = self.encode_captions(tokenizer, prompts, length).to(device)
        return model.text_encoder(ids).last_hidden_state


def _fit_tokenizer(captions: list[str], length: int) -> Any:
    """A word-level tokenizer (lowercased, split on spaces and punctuation) of the captions."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=[PAD, UNK]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK,
                                   model_max_length=length)


def _empty_ids(tokenizer: Any, length: int) -> torch.Tensor:
    """The ids of the empty caption (all padding without a tokenizer, as on the meta device)."""
    if tokenizer is None:
        return torch.zeros(length, dtype=torch.long)
    return tokenizer([""], padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids[0]


def _validation_prompts(captions: list[str], limit: int = 10) -> list[str]:
    """The first distinct captions, in order: the sample grid's rows at each checkpoint."""
    seen: dict[str, None] = {}
    for c in captions:
        seen.setdefault(c, None)
        if len(seen) == limit:
            break
    return list(seen)
