"""The generation parameters, declared once: the API, the Batch API, items, packing and generate().

A new option is one field, on TextParams (text sampling) or ImageParams (drawing), which
GenParams joins. GenerateSpec (POST /v1/jobs), TextBody (a Batch API text line) and ItemInput
(what an item stores, and what a worker hands to generate()) inherit GenParams, and ImageBody
(a Batch API images line) inherits ImageParams, so no layer keeps its own list of keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from common.config import get_settings


def _within_token_cap(v: int) -> int:
    cap = get_settings().max_tokens_cap
    if v > cap:
        raise ValueError(f"must be <= {cap} (GENQ_MAX_TOKENS_CAP)")
    return v


def _within_prompt_cap(v: str) -> str:
    cap = get_settings().max_prompt_chars
    if len(v) > cap:
        raise ValueError(f"is longer than {cap} characters (GENQ_MAX_PROMPT_CHARS)")
    return v


def _image_size(v: str) -> str:
    if v == "auto":
        return v
    width, sep, height = v.partition("x")
    if not (sep and width.isdigit() and height.isdigit()
            and 1 <= int(width) <= MAX_SIDE and 1 <= int(height) <= MAX_SIDE):
        raise ValueError(f"must be 'auto' or WIDTHxHEIGHT with each side in [1, {MAX_SIDE}] "
                         f"(e.g. '256x256'), got {v!r}")
    return v


MAX_SIDE = 4096  # of a generated image
MaxTokens = Annotated[int, Field(ge=1), AfterValidator(_within_token_cap)]
ImageSize = Annotated[str, Field(max_length=16), AfterValidator(_image_size)]
Steps = Annotated[int, Field(ge=1, le=1000)]  # denoising steps
SMALLEST = 1e-12


def not_vanishing(v: float) -> float:
    """A positive value under 1e-12 (down to 1e-320, a subnormal) is a typo or an attack:
    nothing trains or samples sensibly there, and subnormal arithmetic is slow on CPUs."""
    if 0 < abs(v) < SMALLEST:
        raise ValueError(f"{v:g} is vanishingly small: use 0 where allowed, else at least "
                         f"{SMALLEST:g}")
    return v


NotTiny = AfterValidator(not_vanishing)  # for float fields: Annotated[float, NotTiny]
GuidanceScale = Annotated[float, Field(ge=0, le=50), NotTiny]  # classifier-free guidance
Prompt = Annotated[str, AfterValidator(_within_prompt_cap)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
Label = Annotated[int, Field(ge=0, le=100_000)]  # a class of a conditional image model
MIN_TEMPERATURE = 1e-3


class TextParams(BaseModel):
    """How to continue a prompt: the sampling options only text models take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: MaxTokens = 32
    temperature: float = Field(1.0, ge=0, le=5)  # 0 => greedy; else at least MIN_TEMPERATURE
    top_k: int | None = Field(None, ge=1, le=100_000)
    top_p: Annotated[float, NotTiny] | None = Field(None, gt=0, le=1)
    num_beams: int = Field(1, ge=1, le=16)

    @field_validator("temperature")
    @classmethod
    def _greedy_or_usable(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:  # logits / 1e-320 overflow to inf: NaN probabilities
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return v


class ImageParams(BaseModel):
    """How to draw an image: the seed (text sampling takes it too), `size` for every image
    model, and the diffusion fields for text-to-image models. The Batch API's images body
    (common/batches/schemas.py ImageBody) inherits these, so none is dropped there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: Seed | None = None  # seeded sampling runs alone, so its output never depends on others
    # images: the PNG's width x height ("auto": the model's own, upscaled to 64 at least)
    size: ImageSize | None = None
    # text to image (None: the model's defaults, config.sample_steps / config.guidance_scale)
    steps: Steps | None = None
    guidance_scale: GuidanceScale | None = None
    negative_prompt: Prompt | None = None  # guided away from (default: the empty caption)


# (bases in this order list the text fields first, as the API's schema always has)
class GenParams(ImageParams, TextParams):
    """How to continue a prompt (text) or draw an image; equal params share a batch.

    The text fields apply to text models, `size` to every image model, and the diffusion
    fields to text-to-image models; a model that cannot honour a field it is given refuses
    the request (common/ml/generate.py validate_requests) rather than ignore it.
    """

    @property
    def params(self) -> GenParams:
        """Just the generation parameters of this object (a subclass carries more)."""
        return GenParams.model_construct(**{k: getattr(self, k) for k in GenParams.model_fields})

    @property
    def sampling(self) -> bool:
        """Random draws (so a seed matters); greedy and beam search are deterministic."""
        return self.temperature > 0.0 and self.num_beams == 1

    def batch_key(self) -> tuple:
        """The parameter values that decide which requests can share one batch: all but the
        seed (a plain tuple: it is computed for every request of a batch)."""
        return tuple(getattr(self, name) for name in _BATCHED)


_BATCHED = tuple(name for name in GenParams.model_fields if name != "seed")


def packing_key(gen: Mapping[str, Any]) -> tuple[tuple, int]:
    """Requests with equal keys are packed into batches together (unless isolated), read
    from a request's stored form (an item's `gen`, ItemInput.model_dump()): sharding a
    window computes it for every request, and building each model cost more than the rest."""
    return tuple(gen[name] for name in _BATCHED), gen["n"]


class ItemInput(GenParams):
    """One item's request (items.request["gen"]): its prompt or label, n, and the parameters."""

    prompt: Prompt | None = None  # text families
    label: Label | None = None  # image families (conditioning); None = unconditional
    n: int = Field(1, ge=1, le=10_000)
    prompt_ids: list[int] | None = None  # the prompt already tokenized (batches)

    @property
    def isolated_sampling(self) -> bool:
        """Seeded random text: generated alone (images with a seed are isolated too)."""
        return self.seed is not None and self.sampling


# The request fields that only some models honour, by what a model generates from
IMAGE_FIELDS = ("size",)
DIFFUSION_FIELDS = ("steps", "guidance_scale", "negative_prompt")
HONOURED = {"text": (), "image": IMAGE_FIELDS, "text-to-image": IMAGE_FIELDS + DIFFUSION_FIELDS}


def unsupported_fields(kind: str, r: ItemInput) -> list[str]:
    """The fields of a request that a model of `kind` ("text", "image", "text-to-image";
    common.train_spec.generation_kind) cannot honour: a problem each, never ignored."""
    problems = [f"{name}: a{'n' if kind == 'image' else ''} {kind} model does not take it"
                for name in IMAGE_FIELDS + DIFFUSION_FIELDS
                if name not in HONOURED[kind] and getattr(r, name) is not None]
    if kind == "text-to-image" and r.label is not None:
        problems.append("label: a text-to-image model draws for a prompt, not a label")
    return problems
