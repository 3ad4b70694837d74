"""MLP GAN: generator and discriminator, BCE-with-logits, optional label conditioning."""

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


class GANConfig(ImageConfig):
    """With `conditional`, a one-hot label joins z and the discriminator input."""

    hidden: int = Field(64, ge=1, le=65_536)  # width of both networks' hidden layers
    latent: int = Field(16, ge=1, le=65_536)  # size of the generator's noise z


class Generator(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        h = cfg.hidden
        self.net = nn.Sequential(
            nn.Linear(cfg.latent + cfg.n_classes, h), nn.LeakyReLU(0.2),
            nn.Linear(h, h), nn.LeakyReLU(0.2),
            nn.Linear(h, cfg.data_dim), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, y], dim=-1))  # (B, D) in [-1, 1]


class Discriminator(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        h = cfg.hidden
        self.net = nn.Sequential(
            nn.Linear(cfg.data_dim + cfg.n_classes, h), nn.LeakyReLU(0.2),
            nn.Linear(h, h), nn.LeakyReLU(0.2),
            nn.Linear(h, 1),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, y], dim=-1)).squeeze(-1)  # (B,) logits, real > 0


class GAN(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg = cfg
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)


class GANFamily(ImageFamily[GANConfig, GAN]):
    Config = GANConfig
    PHASES = ("d", "g")  # discriminator step, then generator step, each with its own optimizer
    OPTIMIZER = "adam"
    BETAS = (0.5, 0.999)

    def prepare(self, cfg: GANConfig, data: TextData | ImageData) -> tuple[GANConfig, None]:
        """Fit the config to the images; image families have no tokenizer."""
        return fit_to_images(cfg, data), None

    def build_model(self, cfg: GANConfig, tokenizer: None = None,
                    arch: dict | None = None) -> GAN:
        return GAN(cfg)

    def train_memory(self, cfg: GANConfig, batch_size: int, seq_len: int) -> int:
        """Per image: real and fake pixels through both networks (5 x pixels), the hidden
        layers of one generator and two discriminator passes (12 x hidden), and z."""
        return batch_size * (5 * cfg.data_dim + 12 * cfg.hidden + 3 * cfg.latent) * 4

    def phase_params(self, model: GAN, phase: str) -> list[nn.Parameter]:
        part = model.discriminator if phase == "d" else model.generator
        return list(part.parameters())

    def loss(self, model: GAN, batch: tuple[torch.Tensor, torch.Tensor | None],
             phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator: real -> 1, fake -> 0. Generator (non-saturating): fake -> 1."""
        images, labels = batch
        real = images.flatten(1) * 2 - 1  # (B, D) in [-1, 1] to match the tanh output
        b = real.size(0)
        y = one_hot(labels, model.cfg.n_classes, b, real.device)
        z = torch.randn(b, model.cfg.latent, device=real.device)
        fake = model.generator(z, y)
        ones, zeros = torch.ones(b, device=real.device), torch.zeros(b, device=real.device)
        if phase == "d":
            d_real = model.discriminator(real, y)
            d_fake = model.discriminator(fake.detach(), y)
            d_loss = (F.binary_cross_entropy_with_logits(d_real, ones)
                      + F.binary_cross_entropy_with_logits(d_fake, zeros))
            return d_loss, {"d_loss": d_loss.detach(),
                            "d_real": torch.sigmoid(d_real).mean().detach(),
                            "d_fake": torch.sigmoid(d_fake).mean().detach()}
        g_loss = F.binary_cross_entropy_with_logits(model.discriminator(fake, y), ones)
        return g_loss, {"g_loss": g_loss.detach()}

    @torch.no_grad()
    def sample_images(self, model: GAN, n: int, labels: torch.Tensor | None) -> torch.Tensor:
        """Generate n images -> (n, C, H, W) in [0, 1]."""
        z, y = prior_draw(model.cfg, model.cfg.latent, n, labels, next(model.parameters()).device)
        return as_images(model.cfg, (model.generator(z, y).float() + 1) / 2)
