"""The family contract: what a model family gives training, checkpoints and generation.

A family is one file: its config (a `FamilyConfig`), its modules, and one subclass of
`TextFamily`, `ImageFamily` or `TextToImageFamily`, registered by name in
`common.ml.families`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, field_validator

from common.gen_params import GenParams, not_vanishing
from common.ml.data import ImageData, TextData
from common.ml.pretrained import ModelSource
from common.ml.sampling import Completion

# The validation context of a config submitted with a training spec: paths it names must
# exist now. A checkpoint's config is read back without it, since its weights and saved
# architecture no longer need those paths.
SUBMITTED: dict[str, Any] = {"submitted": True}


class FamilyConfig(BaseModel):
    """A family's hyperparameters: strict types, bounds on each field, no unknown keys, and
    no float so small that it is a typo or an attack (gen_params.NotTiny)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_vanishing_float(cls, value: Any) -> Any:
        return not_vanishing(value) if isinstance(value, float) else value


ConfigT = TypeVar("ConfigT", bound=FamilyConfig)
ModelT = TypeVar("ModelT", bound=nn.Module)
TokenizerT = TypeVar("TokenizerT")


class Family(ABC, Generic[ConfigT, ModelT]):
    """What the training loop and checkpoints call, for every family."""

    KIND: ClassVar[str]  # "text" or "image": the data it trains on and what it generates
    PHASES: ClassVar[tuple[str, ...]] = ("main",)  # one optimizer each, stepped in turn
    OPTIMIZER: ClassVar[str] = "adamw"  # used when the spec names none
    BETAS: ClassVar[tuple[float, float]] = (0.9, 0.999)
    # the training spec's defaults for this family, used when a spec names no config and no
    # steps (TrainSpec): a recipe known to train a useful model on the built-in data
    RECIPE: ClassVar[dict[str, Any]] = {}
    # peft's task type for a LoRA run's wrapper (TrainSpec.adapter); None: a plain PeftModel
    ADAPTER_TASK: ClassVar[str | None] = None
    # config fields naming a folder under GENQ_PRETRAINED_ROOT or a hub id: TrainSpec confines
    # a folder to that root
    PRETRAINED_FIELDS: ClassVar[tuple[str, ...]] = ()
    ADAPTERS: ClassVar[bool] = False  # whether a spec may give it a LoRA adapter (TrainSpec)
    Config: type[ConfigT]

    @property
    def supports_gradient_checkpointing(self) -> bool:
        """Whether it implements enable_gradient_checkpointing (TrainSpec refuses it else)."""
        return type(self).enable_gradient_checkpointing is not Family.enable_gradient_checkpointing

    @abstractmethod
    def prepare(self, cfg: ConfigT, data: TextData | ImageData) -> tuple[ConfigT, Any]:
        """Fit the config to the data; also the tokenizer (None for image families)."""

    @abstractmethod
    def build_model(self, cfg: ConfigT, tokenizer: Any = None,
                    arch: dict | None = None) -> ModelT:
        """A fresh model; `arch` is what `architecture` saved with a checkpoint."""

    def train_memory(self, cfg: ConfigT, batch_size: int, seq_len: int) -> int | None:
        """A rough upper bound on the bytes a training micro-batch's activations and their
        gradients take (fp32), from the config alone; None: unknown (a pretrained model)."""
        return None

    def architecture(self, model: ModelT) -> dict | None:
        """What rebuilds the model besides its config (checkpoint meta "arch"); None: nothing."""
        return None

    def source(self, cfg: ConfigT) -> ModelSource | None:
        """Where the starting weights came from (checkpoint meta "source"); None: nowhere."""
        return None

    def phase_params(self, model: ModelT, phase: str) -> list[nn.Parameter]:
        """The parameters that `phase`'s optimizer steps."""
        return list(model.parameters())

    def adapter_problems(self, cfg: ConfigT) -> list[str]:
        """Why a LoRA adapter (TrainSpec.adapter) cannot train over this config's model."""
        return []

    def adapter_targets(self, model: ModelT,
                        names: list[str] | str | None) -> list[str] | str | None:
        """peft's target_modules for the spec's: as given (None: peft's default for the
        architecture); ValueError when they name nothing the adapter can wrap."""
        return names

    def after_step(self, model: ModelT) -> None:
        """Called after each optimizer step (e.g. to update an EMA copy of the weights)."""

    def enable_gradient_checkpointing(self, model: ModelT) -> None:
        """Recompute activations in the backward pass (TrainSpec.gradient_checkpointing)."""
        raise ValueError("gradient_checkpointing: this family does not support it")

    @abstractmethod
    def loss(self, model: ModelT, batch: Any,
             phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss `phase` minimises on a batch, and extra metrics to log."""


class TextFamily(Family[ConfigT, ModelT], Generic[ConfigT, ModelT, TokenizerT]):
    """A language model: batches are (inputs, targets) token ids, each (B, T)."""

    KIND = "text"

    @abstractmethod
    def prepare(self, cfg: ConfigT, data: TextData | ImageData) -> tuple[ConfigT, TokenizerT]:
        """Fit the config to the text and build (or load) the tokenizer."""

    @abstractmethod
    def encode(self, tokenizer: TokenizerT, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""

    @abstractmethod
    def context_limit(self, model: ModelT) -> int | None:
        """The longest sequence the model takes; None if unbounded."""

    @abstractmethod
    def complete(self, model: ModelT, tokenizer: TokenizerT, prompts: list[list[int]],
                 params: GenParams, n: int) -> list[list[Completion]]:
        """n continuations of each prompt."""

    @abstractmethod
    def save_tokenizer(self, tokenizer: TokenizerT, directory: Path) -> None:
        """Write the tokenizer's files into a checkpoint directory."""

    @abstractmethod
    def load_tokenizer(self, directory: Path) -> TokenizerT:
        """Read back what `save_tokenizer` wrote."""


class ImageFamily(Family[ConfigT, ModelT]):
    """An image model: batches are (images (B, C, H, W) in [0, 1], labels (B,) or None)."""

    KIND = "image"

    @abstractmethod
    def sample_images(self, model: ModelT, n: int, labels: torch.Tensor | None) -> torch.Tensor:
        """n images (n, C, H, W) in [0, 1]; `labels` (n,) for a conditional model."""


class TextToImageFamily(Family[ConfigT, ModelT]):
    """An image model conditioned on a text prompt: batches are (images (B, C, H, W) in
    [0, 1], caption token ids (B, L)); it generates images for prompts."""

    KIND = "image"

    @abstractmethod
    def prepare(self, cfg: ConfigT, data: TextData | ImageData) -> tuple[ConfigT, Any]:
        """Fit the config to the captioned images and build (or load) the tokenizer."""

    @abstractmethod
    def encode_captions(self, tokenizer: Any, captions: list[str], length: int) -> torch.Tensor:
        """(N, length) token ids of the captions, padded and cut."""

    @abstractmethod
    def caption_length(self, model: ModelT) -> int:
        """The number of tokens the model's text encoder takes."""

    @abstractmethod
    def images_for(self, model: ModelT, tokenizer: Any, cfg: ConfigT, prompts: list[str],
                   params: GenParams) -> torch.Tensor:
        """One image per prompt, (N, C, H, W) in [0, 1]."""

    @abstractmethod
    def save_tokenizer(self, tokenizer: Any, directory: Path) -> None:
        """Write the tokenizer's files into a checkpoint directory."""

    @abstractmethod
    def load_tokenizer(self, directory: Path) -> Any:
        """Read back what `save_tokenizer` wrote."""


# What the registry holds: isinstance on one kind narrows it to the others.
AnyFamily = TextFamily[Any, Any, Any] | ImageFamily[Any, Any] | TextToImageFamily[Any, Any]
