"""GPT-style causal LM via transformers: from a config (from scratch) or a local pretrained dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator

from common.errors import ConfigProblem
from common.gen_params import GenParams
from common.ml.data import ImageData, TextData
from common.ml.families.base import SUBMITTED, FamilyConfig, TextFamily
from common.ml.sampling import Completion

EOT = "<|endoftext|>"


class GPTConfig(FamilyConfig):
    """With `pretrained`, the directory's own config replaces the fields above it."""

    # byte-level BPE trained on the data: 256 bytes + EOT at least
    vocab_size: int = Field(512, ge=257, le=1_000_000)
    n_positions: int = Field(128, ge=2, le=1_048_576)  # context length
    n_embd: int = Field(32, ge=1, le=65_536)  # a multiple of n_head
    n_layer: int = Field(2, ge=1, le=1024)
    n_head: int = Field(2, ge=1, le=1024)
    dropout: float = Field(0.0, ge=0, lt=1)
    # a local directory with config.json + weights + tokenizer
    pretrained: str | None = Field(None, max_length=1024)

    @field_validator("pretrained")
    @classmethod
    def _holds_a_model(cls, pretrained: str | None, info: ValidationInfo) -> str | None:
        if (pretrained is not None and info.context == SUBMITTED
                and not (Path(pretrained) / "config.json").is_file()):
            raise ValueError("must be a local directory holding a transformers model "
                             "(config.json not found)")
        return pretrained

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ConfigProblem("n_embd", f"must be divisible by n_head ({self.n_head}), "
                                          f"got {self.n_embd}")
        return self


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


class GPTFamily(TextFamily[GPTConfig, nn.Module, Any]):
    Config = GPTConfig
    BETAS = (0.9, 0.95)

    def prepare(self, cfg: GPTConfig, data: TextData | ImageData) -> tuple[GPTConfig, Any]:
        """Train (or load the pretrained) tokenizer and size the vocabulary to it."""
        if not isinstance(data, TextData):
            raise ValueError("data: this family needs text data")
        if cfg.pretrained:
            return cfg, self.load_tokenizer(Path(cfg.pretrained))
        tokenizer = train_tokenizer(data.text, cfg.vocab_size)
        return cfg.model_copy(update={"vocab_size": len(tokenizer)}), tokenizer

    def build_model(self, cfg: GPTConfig, tokenizer: Any = None,
                    arch: dict | None = None) -> nn.Module:
        """From a saved architecture (checkpoints), the pretrained dir, or the config."""
        from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

        if arch is not None:
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
        if cfg.pretrained:
            return AutoModelForCausalLM.from_pretrained(
                cfg.pretrained, local_files_only=True, trust_remote_code=False,
                dtype=torch.float32)
        eot = tokenizer.eos_token_id if tokenizer is not None else 0
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
            n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=eot, eos_token_id=eot,
            pad_token_id=eot))

    def architecture(self, model: Any) -> dict:
        """The transformers config that rebuilds this model without its source."""
        return model.config.to_dict()

    def context_limit(self, model: nn.Module) -> int | None:
        c = model.config
        return getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)

    def encode(self, tokenizer: Any, text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False, verbose=False)

    def save_tokenizer(self, tokenizer: Any, directory: Path) -> None:
        tokenizer.save_pretrained(str(directory))

    def load_tokenizer(self, directory: Path) -> Any:
        from transformers import AutoTokenizer

        return _ready(AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                    trust_remote_code=False))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
             phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token cross-entropy."""
        x, y = batch  # (B, T) each
        # use_cache=False: a training forward would otherwise fill a KV cache it never reads
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), {}

    @torch.no_grad()
    def complete(self, model: Any, tokenizer: Any, prompts: list[list[int]],
                 params: GenParams, n: int) -> list[list[Completion]]:
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
