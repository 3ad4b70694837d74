"""GPT-style causal LM via transformers: from a config (from scratch) or a local pretrained dir."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.ml.data import TextData
from common.ml.sampling import Completion, SamplingParams

KIND = "text"
PHASES = ("main",)
OPTIMIZER: dict = {"optimizer": "adamw", "betas": (0.9, 0.95)}
EOT = "<|endoftext|>"


@dataclass
class Config:
    vocab_size: int = 512  # BPE vocabulary trained on the data (ignored with `pretrained`)
    n_positions: int = 128
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 2
    dropout: float = 0.0
    pretrained: str | None = None  # local directory with config.json + weights + tokenizer


RULES = [
    ("vocab_size", lambda v: v >= 257, "must be >= 257 (256 bytes + end-of-text)"),
    ("n_positions", lambda v: v >= 2, "must be >= 2"),
    ("n_embd", lambda v: v >= 1, "must be >= 1"),
    ("n_layer", lambda v: v >= 1, "must be >= 1"),
    ("n_head", lambda v: v >= 1, "must be >= 1"),
    ("dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("pretrained", lambda v: (Path(v) / "config.json").is_file(),
     "must be a local directory holding a transformers model (config.json not found)"),
]


def check_config(cfg: Config) -> list[str]:
    """Cross-field problems."""
    if cfg.n_embd % cfg.n_head:
        return [f"config.n_embd: must be divisible by n_head ({cfg.n_head}), got {cfg.n_embd}"]
    return []


def train_tokenizer(text: str, vocab_size: int) -> Any:
    """Byte-level BPE trained on `text`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   pad_token=EOT, padding_side="left",
                                   model_max_length=int(1e12))


def _ready(tokenizer: Any) -> Any:
    """Left padding, and a pad token (the end-of-text one) where the tokenizer has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare(cfg: Config, data: TextData) -> tuple[Config, Any]:
    """Train (or load the pretrained) tokenizer and size the vocabulary to it."""
    if not isinstance(data, TextData):
        raise ValueError("data: this family needs text data")
    if cfg.pretrained:
        return cfg, load_tokenizer(Path(cfg.pretrained))
    tokenizer = train_tokenizer(data.text, cfg.vocab_size)
    return dataclasses.replace(cfg, vocab_size=len(tokenizer)), tokenizer


def build_model(cfg: Config, tokenizer: Any = None, arch: dict | None = None) -> nn.Module:
    """From a saved architecture (checkpoints), the pretrained dir, or the config."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if arch is not None:
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
    if cfg.pretrained:
        return AutoModelForCausalLM.from_pretrained(
            cfg.pretrained, local_files_only=True, trust_remote_code=False, dtype=torch.float32)
    eot = tokenizer.eos_token_id if tokenizer is not None else 0
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=eot, eos_token_id=eot,
        pad_token_id=eot))


def architecture(model: Any) -> dict:
    """The transformers config that rebuilds this model without its source."""
    return model.config.to_dict()


def context_limit(model: nn.Module) -> int | None:
    c = model.config
    return getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)


def phase_params(model: nn.Module, phase: str) -> list[nn.Parameter]:
    return list(model.parameters())


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return _ready(AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                trust_remote_code=False))


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
         phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy."""
    x, y = batch  # (B, T) each
    # use_cache=False: a training forward would otherwise fill a KV cache it never reads
    logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), {}


@torch.no_grad()
def complete(model: Any, tokenizer: Any, prompts: list[list[int]],
             params: SamplingParams, n: int) -> list[list[Completion]]:
    """n continuations per prompt via model.generate, left-padded with an attention mask."""
    if params.max_tokens == 0:
        return [[Completion("", 0, "length")] * n for _ in prompts]
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [p or [eos] for p in prompts]  # an empty prompt starts after end-of-text
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    kwargs: dict[str, Any] = {"max_new_tokens": params.max_tokens, "pad_token_id": pad,
                              "eos_token_id": eos}
    copies = 1
    if params.num_beams > 1:  # deterministic beam search: temperature does not apply
        kwargs.update(num_beams=max(params.num_beams, n), num_return_sequences=n,
                      early_stopping=True, do_sample=False)
    elif not params.sampling:
        kwargs.update(do_sample=False)
        copies = n  # greedy continuations are identical: compute one, copy it
    else:
        kwargs.update(do_sample=True, num_return_sequences=n, temperature=params.temperature,
                      top_k=params.top_k or 0,
                      top_p=params.top_p if params.top_p is not None else 1.0)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:].tolist()
    per_row = len(out) // len(rows)
    results = []
    for i in range(len(rows)):
        completions = []
        for gen in out[i * per_row:(i + 1) * per_row]:
            stop = eos in gen
            gen = gen[:gen.index(eos)] if stop else gen
            completions.append(Completion(tokenizer.decode(gen, skip_special_tokens=True),
                                          len(gen) + int(stop), "stop" if stop else "length"))
        results.append([c for c in completions for _ in range(copies)])
    return results
