"""Chat and prompt/completion examples as training rows: one example a sequence, padded
or cut to the same length, with target -100 (what cross-entropy ignores) where no loss is
taken: prompts, non-assistant messages, template markup and padding."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from common.chat import as_dicts, chat_segments, render_fallback, tokenizer_render
from common.ml.data import ChatExample, Example

log = logging.getLogger(__name__)

IGNORE = -100  # F.cross_entropy's default ignore_index, and transformers' causal-LM loss's


def example_segments(tokenizer: Any, example: Example) -> list[tuple[str, bool]]:
    """The example as (text, trained) pieces, rendered as generation will render it.

    A chat goes through the tokenizer's chat template, else genq's fallback; without a
    template of its own the model learns to end its answer with the end-of-text token
    where the tokenizer has one (a template writes its own end-of-turn markup).
    """
    if isinstance(example, ChatExample):
        render = tokenizer_render(tokenizer)
        segments = chat_segments(render, as_dicts(example.messages))
        templated = render is not render_fallback
    else:
        segments = [(example.prompt, False), (example.completion, True)]
        templated = False
    eos = getattr(tokenizer, "eos_token", None)
    if not templated and isinstance(eos, str) and segments[-1][1]:  # after a last answer
        segments.append((eos, True))
    return segments


def encode_examples(encode: Callable[[Any, str], list[int]], tokenizer: Any,
                    examples: list[Example], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (N, T) with T = min(seq_len, the longest example); an example
    whose trained tokens all lie past seq_len is left out (ValueError when all are)."""
    rows: list[tuple[list[int], list[int]]] = []
    for number, example in enumerate(examples, start=1):
        try:
            segments = example_segments(tokenizer, example)
        except Exception as e:  # a template's raise_exception, a jinja error, or ours
            raise ValueError(f"data: example {number}: the tokenizer's chat template cannot "
                             f"render it ({e})") from e
        ids: list[int] = []
        trained: list[bool] = []
        for text, train in segments:
            piece = encode(tokenizer, text)
            ids += piece
            trained += [train] * len(piece)
        targets = [t if train else IGNORE for t, train in zip(ids[1:], trained[1:], strict=True)]
        inputs, targets = ids[:-1][:seq_len], targets[:seq_len]
        if any(t != IGNORE for t in targets):
            rows.append((inputs, targets))
    if len(rows) < len(examples):
        log.warning("%d of %d examples left out: nothing to learn within seq_len %d",
                    len(examples) - len(rows), len(examples), seq_len)
    if not rows:
        raise ValueError(f"seq_len: every example's trained tokens lie past {seq_len} tokens")
    width = max(len(x) for x, _ in rows)
    pad = getattr(tokenizer, "pad_token_id", None) or 0  # never attended: right padding
    return (torch.tensor([x + [pad] * (width - len(x)) for x, _ in rows]),  # (N, T)
            torch.tensor([y + [IGNORE] * (width - len(y)) for _, y in rows]))  # (N, T)
