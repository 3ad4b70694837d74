"""What the image families share: fitting a config to the images, and label one-hots."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from common.ml.data import ImageData


def fit_to_images(cfg: Any, data: ImageData) -> Any:
    """Return `cfg` with channels/height/width/n_classes taken from the dataset."""
    if not isinstance(data, ImageData):
        raise ValueError("data: this family needs image data")
    if cfg.conditional and data.labels is None:
        raise ValueError("config.conditional: the dataset has no labels to condition on")
    _, c, h, w = data.images.shape
    return dataclasses.replace(cfg, channels=c, height=h, width=w,
                               n_classes=data.n_classes if cfg.conditional else 0)


def one_hot(labels: torch.Tensor | None, n_classes: int, batch: int,
            device: torch.device) -> torch.Tensor:
    """Labels (B,) -> (B, n_classes) float; (B, 0) for an unconditional model."""
    if n_classes == 0:
        return torch.zeros(batch, 0, device=device)
    if labels is None:  # unconditional request to a conditional model: pick labels at random
        labels = torch.randint(0, n_classes, (batch,), device=device)
    return F.one_hot(labels.to(device), n_classes).float()
