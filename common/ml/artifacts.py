"""Pictures a person looks at: PNGs of generated images, sample grids, the loss curve."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_pil(image: torch.Tensor, min_size: int = 64) -> Image.Image:
    """(C, H, W) in [0, 1] -> PIL image, upscaled (nearest) to at least min_size per side."""
    c, h, w = image.shape
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    array = pixels.permute(1, 2, 0).numpy()  # (H, W, C)
    pil = Image.fromarray(array[:, :, 0] if c == 1 else np.ascontiguousarray(array), MODES[c])
    scale = max(1, math.ceil(min_size / min(h, w)))
    return pil.resize((w * scale, h * scale), Image.Resampling.NEAREST) if scale > 1 else pil


def png_bytes(image: torch.Tensor, min_size: int = 64, size: str | None = None) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes at least min_size x min_size, or exactly `size`
    ("WIDTHxHEIGHT"; whole multiples keep the pixels sharp, others are resampled bicubic)."""
    buf = io.BytesIO()
    pil = to_pil(image, min_size if size in (None, "auto") else 1)
    if size not in (None, "auto"):
        width, height = (int(v) for v in size.split("x"))
        sharp = width % pil.width == 0 and height % pil.height == 0
        pil = pil.resize((width, height), Image.Resampling.NEAREST if sharp
                         else Image.Resampling.BICUBIC)
    pil.save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, cell: int = 64) -> None:
    """(N, C, H, W) in [0, 1] -> one PNG grid, each image upscaled to `cell` pixels."""
    n, c = images.shape[:2]
    tiles = [to_pil(img, cell) for img in images]
    tw, th = tiles[0].size
    rows = math.ceil(n / nrow)
    grid = Image.new(MODES[c], (nrow * tw + (nrow + 1) * 2, rows * th + (rows + 1) * 2))
    for i, tile in enumerate(tiles):
        r, col = divmod(i, nrow)
        grid.paste(tile, (2 + col * (tw + 2), 2 + r * (th + 2)))
    grid.save(path, format="PNG")


def save_loss_plot(steps: list[int], losses: list[float], path: Path, title: str) -> None:
    """The training loss curve as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
