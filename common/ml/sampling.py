"""Next-token selection and seeding, shared by the text families."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.gen_params import GenParams


@dataclass
class Completion:
    """One generated continuation (without the prompt)."""

    text: str
    tokens_out: int
    finish_reason: str  # "stop" | "length"


def seed_torch(seed: int, device: str) -> None:
    """torch.manual_seed for the device in use.

    On CPU, torch.manual_seed also queues a lazy CUDA seeding that formats the whole call
    stack (with linecache lookups) every time: about 0.45 ms per call 60 frames deep, as in
    a worker, paid on every training step. This seeds CUDA only where it computes.
    """
    torch.default_generator.manual_seed(seed)
    if str(device).startswith("cuda"):
        torch.cuda.manual_seed_all(seed)


def pick_next(logits: torch.Tensor, params: GenParams) -> torch.Tensor:
    """Choose the next token ids from logits (B, V) -> (B,) with temperature/top-k/top-p."""
    if not params.sampling:  # greedy; a family without beam search treats beams as greedy
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and 0 < params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= params.top_p
        drop[..., 0] = False  # the most likely token always stays (top_p below float32's range)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(-1)
