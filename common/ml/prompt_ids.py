"""Prompt token ids for a batch, computed by its prepare job without torch or transformers.

A batch is cut into shards of similar prompt length, and each shard packs its generation
batches on its own. Cut by characters, shards of same-length prompts with different token
counts pack worse than one in-process call; cut by tokens they pack alike. So the prepare
job (common/batches/create.py) tokenizes a batch's prompts once, with the checkpoint's own
`tokenizer.json`, sorts by token count, and stores the ids with each item; the shard
reuses them instead of encoding again. Models without a `tokenizer.json` (the
character-level LSTM, whose token count is the character count) keep the character-length
order and are encoded in the worker.

The chat template that renders a /v1/chat/completions line is read from the same
checkpoint files (load_chat_render).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from common.chat import Render, render_fallback
from common.storage import Storage

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"  # what a transformers fast tokenizer saves
TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a chat template
CONFIG_FILE = "tokenizer_config.json"  # older saves keep it here; and the special tokens
CACHED = 8  # tokenizers kept per process, by checkpoint uri

_cache: OrderedDict[str, Any] = OrderedDict()
_renders: OrderedDict[str, Render] = OrderedDict()
_lock = threading.Lock()  # callers may be on several threads


def load_prompt_tokenizer(storage: Storage, checkpoint_uri: str) -> Any | None:
    """The checkpoint's fast tokenizer (tokenizers.Tokenizer), or None when it has none."""
    with _lock:
        if checkpoint_uri in _cache:
            _cache.move_to_end(checkpoint_uri)
            return _cache[checkpoint_uri]
    from tokenizers import Tokenizer

    key = f"{storage.key_of(checkpoint_uri)}/{TOKENIZER_FILE}"
    tokenizer = None
    try:
        tokenizer = Tokenizer.from_str(storage.get_bytes(key).decode())
        # as transformers encodes: no truncation or padding unless asked for
        tokenizer.no_truncation()
        tokenizer.no_padding()
    except FileNotFoundError:
        pass  # no fast tokenizer (the char-level LSTM): shards keep the character order
    except Exception as exc:  # unreadable: the worker's own load reports it properly
        tokenizer = None
        log.warning("%s: tokenizer not usable for sharding (%s)", checkpoint_uri, exc)
    with _lock:
        _cache[checkpoint_uri] = tokenizer
        while len(_cache) > CACHED:
            _cache.popitem(last=False)
    return tokenizer


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt, as the lm family's encode gives them (no special tokens)."""
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: a third quicker
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [e.ids for e in encode(prompts, add_special_tokens=False)]


def load_chat_render(storage: Storage, checkpoint_uri: str) -> Render:
    """How /v1/chat/completions renders messages for this checkpoint: its tokenizer's chat
    template, as transformers' apply_chat_template renders it, else genq's fallback."""
    with _lock:
        if checkpoint_uri in _renders:
            _renders.move_to_end(checkpoint_uri)
            return _renders[checkpoint_uri]
    root = storage.key_of(checkpoint_uri)
    config: dict[str, Any] = {}
    template = None
    try:
        config = json.loads(storage.get_bytes(f"{root}/{CONFIG_FILE}"))
    except (FileNotFoundError, ValueError):
        pass
    try:
        template = storage.get_bytes(f"{root}/{TEMPLATE_FILE}").decode()
    except FileNotFoundError:
        template = config.get("chat_template") if isinstance(config.get("chat_template"),
                                                                str) else None
    render = render_fallback if not template else _template_render(template, config)
    with _lock:
        _renders[checkpoint_uri] = render
        while len(_renders) > CACHED:
            _renders.popitem(last=False)
    return render


def _template_render(template: str, config: dict[str, Any]) -> Render:
    from transformers.utils.chat_template_utils import render_jinja_template

    # the special tokens (bos_token, eos_token, ...) that templates read, as
    # apply_chat_template passes them
    special: dict[str, Any] = {k: v.get("content") if isinstance(v, dict) else v
                               for k, v in config.items()
                               if k.endswith("_token") and isinstance(v, str | dict)}

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        # typed as str, it returns (rendered conversations, generation indices)
        rendered: Any = render_jinja_template(conversations=[messages], chat_template=template,
                                              add_generation_prompt=add_generation_prompt,
                                              **special)
        return str(rendered[0][0])

    return render
