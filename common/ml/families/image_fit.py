"""What the image families share: the config fields fitted to the images, label one-hots,
and the draw of a prior sample."""

from __future__ import annotations

from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from pydantic import Field

from common.ml.data import ImageData, TextData
from common.ml.families.base import FamilyConfig


class ImageConfig(FamilyConfig):
    """The fields every image family takes from its dataset at train time."""

    # condition on a one-hot label (the dataset needs labels); None: when the data has them
    conditional: bool | None = None
    # fitted to the data at train time
    channels: Literal[1, 3, 4] = 1
    height: int = Field(8, ge=1, le=4096)
    width: int = Field(8, ge=1, le=4096)
    n_classes: int = Field(0, ge=0, le=100_000)  # 0 for an unconditional model

    @property
    def data_dim(self) -> int:
        return self.channels * self.height * self.width


ImageConfigT = TypeVar("ImageConfigT", bound=ImageConfig)


def fit_to_images(cfg: ImageConfigT, data: TextData | ImageData) -> ImageConfigT:
    """Return `cfg` with channels/height/width/n_classes taken from the dataset."""
    if not isinstance(data, ImageData):
        raise ValueError("data: this family needs image data")
    if cfg.conditional and data.labels is None:
        raise ValueError("config.conditional: the dataset has no labels to condition on")
    conditional = data.labels is not None if cfg.conditional is None else cfg.conditional
    _, c, h, w = data.images.shape
    return cfg.model_copy(update={"channels": c, "height": h, "width": w,
                                  "conditional": conditional,
                                  "n_classes": data.n_classes if conditional else 0})


def one_hot(labels: torch.Tensor | None, n_classes: int, batch: int,
            device: torch.device) -> torch.Tensor:
    """Labels (B,) -> (B, n_classes) float; (B, 0) for an unconditional model."""
    if n_classes == 0:
        return torch.zeros(batch, 0, device=device)
    if labels is None:  # unconditional request to a conditional model: pick labels at random
        labels = torch.randint(0, n_classes, (batch,), device=device)
    return F.one_hot(labels.to(device), n_classes).float()


def prior_draw(cfg: ImageConfig, latent: int, n: int, labels: torch.Tensor | None,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """n noise vectors z (n, latent) and their label one-hots y (n, n_classes)."""
    return torch.randn(n, latent, device=device), one_hot(labels, cfg.n_classes, n, device)


def as_images(cfg: ImageConfig, flat: torch.Tensor) -> torch.Tensor:
    """(n, D) pixels in [0, 1] -> (n, C, H, W)."""
    return flat.view(flat.size(0), cfg.channels, cfg.height, cfg.width)
