"""MLP variational autoencoder (optionally label-conditioned: CVAE)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from common.ml.data import ImageData, TextData
from common.ml.families.base import ImageFamily
from common.ml.families.image_fit import (
    ImageConfig,
    as_images,
    fit_to_images,
    one_hot,
    prior_draw,
)


class VAEConfig(ImageConfig):
    """With `conditional`, a one-hot label joins the encoder input and z."""

    hidden: int = Field(64, ge=1, le=65_536)  # width of the encoder's and decoder's hidden layer
    latent: int = Field(8, ge=1, le=65_536)  # size of z
    beta: float = Field(1.0, ge=0, le=1000)  # weight of the KL term


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
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


class VAEFamily(ImageFamily[VAEConfig, VAE]):
    Config = VAEConfig

    def prepare(self, cfg: VAEConfig, data: TextData | ImageData) -> tuple[VAEConfig, None]:
        """Fit the config to the images; image families have no tokenizer."""
        return fit_to_images(cfg, data), None

    def build_model(self, cfg: VAEConfig, tokenizer: None = None,
                    arch: dict | None = None) -> VAE:
        return VAE(cfg)

    def train_memory(self, cfg: VAEConfig, batch_size: int, seq_len: int) -> int:
        """Per image: the input, reconstruction logits and loss terms (5 x pixels), the
        hidden layers (4 x hidden) and z's mean, variance and draw (3 x latent)."""
        return batch_size * (5 * cfg.data_dim + 4 * cfg.hidden + 3 * cfg.latent) * 4

    def loss(self, model: VAE, batch: tuple[torch.Tensor, torch.Tensor | None],
             phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Negative ELBO per image: BCE reconstruction summed over pixels + beta * KL."""
        images, labels = batch
        x = images.flatten(1)  # (B, D)
        y = one_hot(labels, model.cfg.n_classes, x.size(0), x.device)  # (B, K)
        mu, logvar = model.encode(x, y)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation
        recon = F.binary_cross_entropy_with_logits(model.decode(z, y), x,
                                                   reduction="sum") / x.size(0)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.size(0)
        return recon + model.cfg.beta * kl, {"recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def sample_images(self, model: VAE, n: int, labels: torch.Tensor | None) -> torch.Tensor:
        """Decode n draws from the prior -> (n, C, H, W) in [0, 1]."""
        z, y = prior_draw(model.cfg, model.cfg.latent, n, labels, next(model.parameters()).device)
        return as_images(model.cfg, torch.sigmoid(model.decode(z, y).float()))
