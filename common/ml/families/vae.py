"""MLP variational autoencoder (optionally label-conditioned: CVAE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.ml.data import ImageData
from common.ml.families.image_fit import fit_to_images, one_hot

KIND = "image"
PHASES = ("main",)
OPTIMIZER: dict = {"optimizer": "adamw", "betas": (0.9, 0.999)}


@dataclass
class Config:
    hidden: int = 64
    latent: int = 8
    beta: float = 1.0  # weight of the KL term
    conditional: bool = False  # concatenate a one-hot label to encoder input and decoder z
    # fitted to the data at train time
    channels: int = 1
    height: int = 8
    width: int = 8
    n_classes: int = 0

    @property
    def data_dim(self) -> int:
        return self.channels * self.height * self.width


RULES = [
    ("hidden", lambda v: v >= 1, "must be >= 1"),
    ("latent", lambda v: v >= 1, "must be >= 1"),
    ("beta", lambda v: v >= 0, "must be >= 0"),
    ("channels", lambda v: v in (1, 3, 4), "must be 1, 3 or 4"),
    ("height", lambda v: v >= 1, "must be >= 1"),
    ("width", lambda v: v >= 1, "must be >= 1"),
    ("n_classes", lambda v: v >= 0, "must be >= 0"),
]


def check_config(cfg: Config) -> list[str]:
    """Cross-field problems (none for the VAE)."""
    return []


class VAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d, k, h = cfg.data_dim, cfg.n_classes, cfg.hidden
        self.encoder = nn.Sequential(nn.Linear(d + k, h), nn.ReLU(), nn.Linear(h, 2 * cfg.latent))
        self.decoder = nn.Sequential(nn.Linear(cfg.latent + k, h), nn.ReLU(), nn.Linear(h, d))

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(torch.cat([x, y], dim=-1)).chunk(2, dim=-1)  # (B, L) each
        return mu, logvar

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, y], dim=-1))  # (B, D) logits


def prepare(cfg: Config, data: ImageData) -> tuple[Config, None]:
    """Fit the config to the images; image families have no tokenizer."""
    return fit_to_images(cfg, data), None


def build_model(cfg: Config, tokenizer: None = None, arch: dict | None = None) -> VAE:
    return VAE(cfg)


def phase_params(model: VAE, phase: str) -> list[nn.Parameter]:
    return list(model.parameters())


def loss(model: VAE, batch: tuple[torch.Tensor, torch.Tensor | None],
         phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative ELBO per image: BCE reconstruction summed over pixels + beta * KL."""
    images, labels = batch
    x = images.flatten(1)  # (B, D)
    y = one_hot(labels, model.cfg.n_classes, x.size(0), x.device)  # (B, K)
    mu, logvar = model.encode(x, y)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation
    recon = F.binary_cross_entropy_with_logits(model.decode(z, y), x, reduction="sum") / x.size(0)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.size(0)
    return recon + model.cfg.beta * kl, {"recon": recon.detach(), "kl": kl.detach()}


@torch.no_grad()
def sample_images(model: VAE, n: int, labels: torch.Tensor | None) -> torch.Tensor:
    """Decode n draws from the prior -> (n, C, H, W) in [0, 1]."""
    cfg = model.cfg
    device = next(model.parameters()).device
    z = torch.randn(n, cfg.latent, device=device)
    y = one_hot(labels, cfg.n_classes, n, device)
    x = torch.sigmoid(model.decode(z, y).float())
    return x.view(n, cfg.channels, cfg.height, cfg.width)


