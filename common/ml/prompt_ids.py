"""Prompt token ids for a batch, computed in the API without torch or transformers.

A batch is cut into shards of similar prompt length, and each shard packs its generation
batches on its own. Cut by characters, shards of same-length prompts with different token
counts pack worse than one in-process call; cut by tokens they pack alike. So the API
tokenizes a batch's prompts once, with the checkpoint's own `tokenizer.json`, sorts by
token count, and stores the ids with each item; the worker reuses them instead of encoding
again. Models without a `tokenizer.json` (the character-level LSTM, whose token count is
the character count) keep the character-length order and are encoded in the worker.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from common.storage import Storage

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"  # what a transformers fast tokenizer saves
CACHED = 8  # tokenizers kept per API process, by checkpoint uri

_cache: OrderedDict[str, Any] = OrderedDict()
_lock = threading.Lock()  # the API creates batches on several threads


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
