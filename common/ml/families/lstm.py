"""Character-level LSTM language model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from common.gen_params import GenParams
from common.ml.data import ImageData, TextData
from common.ml.families.base import FamilyConfig, TextFamily
from common.ml.sampling import Completion, pick_next

UNKNOWN = "\ufffd"  # id 0: stands in for characters not seen in training


class LSTMConfig(FamilyConfig):
    n_embd: int = Field(32, ge=1, le=65_536)  # character embedding width
    hidden: int = Field(64, ge=1, le=65_536)  # LSTM state width
    n_layer: int = Field(1, ge=1, le=64)
    dropout: float = Field(0.0, ge=0, lt=1)  # between LSTM layers and before the head
    vocab_size: int = Field(0, ge=0, le=1_000_000)  # fitted to the training text


class CharTokenizer:
    """Maps each character seen in training to an id; unseen characters map to 0."""

    FILE = "vocab.json"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls([UNKNOWN] + sorted(set(text) - {UNKNOWN}))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 0) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, directory: Path) -> None:
        (directory / self.FILE).write_text(json.dumps({"chars": self.chars}))

    @classmethod
    def load(cls, directory: Path) -> CharTokenizer:
        return cls(json.loads((directory / cls.FILE).read_text())["chars"])


class LSTMLM(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.lstm = nn.LSTM(cfg.n_embd, cfg.hidden, cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, idx: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        h, state = self.lstm(self.embed(idx), state)  # (B, T, H)
        return self.head(self.drop(h)), state  # (B, T, V)


class LSTMFamily(TextFamily[LSTMConfig, LSTMLM, CharTokenizer]):
    Config = LSTMConfig

    def prepare(self, cfg: LSTMConfig,
                data: TextData | ImageData) -> tuple[LSTMConfig, CharTokenizer]:
        """Build the character vocabulary from the text and size the model to it."""
        if not isinstance(data, TextData):
            raise ValueError("data: this family needs text data")
        tokenizer = CharTokenizer.from_text(data.text)
        return cfg.model_copy(update={"vocab_size": len(tokenizer)}), tokenizer

    def build_model(self, cfg: LSTMConfig, tokenizer: CharTokenizer | None = None,
                    arch: dict | None = None) -> LSTMLM:
        return LSTMLM(cfg)

    def train_memory(self, cfg: LSTMConfig, batch_size: int, seq_len: int) -> int:
        """Per token: the embedding, each layer's gates and states (about 6 x hidden), and the
        logits with their softmax and gradient (3 x vocab; an unfitted vocabulary as 256)."""
        vocab = max(cfg.vocab_size, 256)
        per_token = cfg.n_embd + 6 * cfg.hidden * cfg.n_layer + 3 * vocab
        return batch_size * seq_len * per_token * 4

    def context_limit(self, model: LSTMLM) -> int | None:
        return None

    def encode(self, tokenizer: CharTokenizer, text: str) -> list[int]:
        return tokenizer.encode(text)

    def save_tokenizer(self, tokenizer: CharTokenizer, directory: Path) -> None:
        tokenizer.save(directory)

    def load_tokenizer(self, directory: Path) -> CharTokenizer:
        return CharTokenizer.load(directory)

    def loss(self, model: LSTMLM, batch: tuple[torch.Tensor, torch.Tensor],
             phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-character cross-entropy."""
        x, y = batch  # (B, T) each
        logits, _ = model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), {}

    @torch.no_grad()
    def complete(self, model: LSTMLM, tokenizer: CharTokenizer, prompts: list[list[int]],
                 params: GenParams, n: int) -> list[list[Completion]]:
        """n continuations per prompt; prompts of equal length run as one batch."""
        device = next(model.parameters()).device
        start = tokenizer.index.get("\n", 0)  # an empty prompt starts after a newline
        rows = [p or [start] for p in prompts]
        results: list[list[Completion]] = [[] for _ in prompts]
        for length in sorted({len(r) for r in rows}):
            members = [i for i, r in enumerate(rows) if len(r) == length]
            idx = torch.tensor([rows[i] for i in members for _ in range(n)],
                               device=device)  # (R, T)
            logits, state = model(idx)
            out = []
            for _ in range(params.max_tokens):
                nxt = pick_next(logits[:, -1], params)  # (R,)
                out.append(nxt)
                logits, state = model(nxt[:, None], state)
            generated = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(len(idx))]
            for j, i in enumerate(members):
                for ids in generated[j * n:(j + 1) * n]:
                    results[i].append(Completion(tokenizer.decode(ids), len(ids), "length"))
        return results
