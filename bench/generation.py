"""Bulk generation through the Batch API (driven by the official `openai` SDK) vs the same
batched generation in-process, and vs a batch-size-1 loop."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import Figure, Report, median, paired

N_REQUESTS, N_WARMUP, MAX_TOKENS, N_B1 = 10_000, 200, 16, 60
ROUNDS = 10
HOLD_S = 60  # a held retrieve (?wait=): the API answers as soon as the batch has finished
TERMINAL = {"completed", "failed", "cancelled", "expired"}


def prompts(n: int) -> list[str]:
    """Prompts of varied length (2 to 25 words) cut from the built-in docs text."""
    from pydoc_data.topics import topics

    words = " ".join(topics.values()).split()
    return [" ".join(words[(i * 7) % 50_000 : (i * 7) % 50_000 + 2 + i % 24])[:100]
            for i in range(n)]


def requests(n: int) -> list[Any]:
    from common.ml.generate import GenRequest

    return [GenRequest(key=str(i), prompt=p, max_tokens=MAX_TOKENS, temperature=0.0)
            for i, p in enumerate(prompts(n))]


def checkpoint_dir(model_name: str) -> Path:
    from sqlalchemy import select

    from common.db import session_scope
    from common.models import Checkpoint, Model

    with session_scope() as session:
        model = session.scalar(select(Model).where(Model.name == model_name))
        assert model is not None, model_name
        checkpoint = session.get(Checkpoint, model.checkpoint_id)
        assert checkpoint is not None
        uri = checkpoint.uri
    return Path(uri.removeprefix("file://"))


def in_process(model_name: str, reqs: list[Any]) -> tuple[float, int]:
    """(seconds, tokens out) of common.ml.generate on the same requests and token budget."""
    from common.config import get_settings
    from common.ml.checkpoint import load_model
    from common.ml.generate import generate

    loaded = load_model(checkpoint_dir(model_name))
    tokens = [0]

    def count(outs: list[Any]) -> None:
        tokens[0] += sum(o.tokens_out for o in outs)

    start = time.perf_counter()
    generate(loaded, reqs, token_budget=get_settings().token_budget, on_outputs=count)
    return time.perf_counter() - start, tokens[0]


def batch_file(model_name: str, n: int) -> Path:
    path = Path(tempfile.mkdtemp(prefix="genq-bench-")) / f"batch-{n}.jsonl"
    with path.open("w") as f:
        for i, p in enumerate(prompts(n)):
            body = {"model": model_name, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                "url": "/v1/completions", "body": body}) + "\n")
    return path


def through_sdk(sdk: Any, model_name: str, n: int) -> tuple[float, int]:
    """(seconds, tokens out) of upload → create → held retrieve → download with the openai SDK.

    Checks the output holds every custom_id exactly once.
    """
    path = batch_file(model_name, n)
    start = time.perf_counter()
    with path.open("rb") as f:
        upload = sdk.files.create(file=f, purpose="batch")
    shutil.rmtree(path.parent)
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                               completion_window="24h")
    while batch.status not in TERMINAL:
        batch = sdk.batches.retrieve(batch.id, extra_query={"wait": HOLD_S}, timeout=HOLD_S + 30)
    assert batch.status == "completed" and batch.output_file_id, batch
    lines = sdk.files.content(batch.output_file_id).text.splitlines()
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in lines]
    ids = [row["custom_id"] for row in rows]
    assert len(ids) == n and set(ids) == {f"r{i}" for i in range(n)}, (len(ids), len(set(ids)))
    assert batch.request_counts.completed == n, batch.request_counts
    tokens = sum(row["response"]["body"]["usage"]["completion_tokens"] for row in rows)
    return seconds, tokens


def bench_generation(report: Report, sdk: Any, model_name: str) -> None:
    reqs = requests(N_REQUESTS)
    in_process(model_name, reqs[:N_WARMUP])  # warm-up: first-call allocations
    through_sdk(sdk, model_name, N_WARMUP)  # warm-up: the worker's model cache
    tokens: list[float] = []

    def queue_rate() -> float:
        seconds, out = through_sdk(sdk, model_name, N_REQUESTS)
        tokens.append(out / seconds)
        return N_REQUESTS / seconds

    queue, local, rounds = paired(ROUNDS, queue_rate,
                                  lambda: N_REQUESTS / in_process(model_name, reqs)[0])
    report.add(Figure(f"bulk generation through the Batch API ({N_REQUESTS:,} requests, "
                      f"{MAX_TOKENS} tokens, tiny gpt, openai SDK)", queue, "req/s",
                      baseline=local, target=0.90, rounds=rounds,
                      note="in-process common.ml.generate, same requests and batching; the "
                           "queue's time runs from upload to the downloaded output file "
                           f"(a retrieve held with ?wait={HOLD_S} answers when the batch "
                           f"completes), which held all {N_REQUESTS:,} custom_ids once each"))
    b1_s, b1_tokens = 0.0, 0
    for r in reqs[:N_B1]:
        s, t = in_process_one(model_name, r)
        b1_s, b1_tokens = b1_s + s, b1_tokens + t
    report.add(Figure("dynamic batching gain: queue tokens/s vs a B=1 loop", median(tokens),
                      "tok/s", baseline=b1_tokens / b1_s, target=8.0,
                      note=f"B=1 loop over {N_B1} of the same requests, in-process"))


_loaded: dict[str, Any] = {}


def in_process_one(model_name: str, req: Any) -> tuple[float, int]:
    from common.ml.checkpoint import load_model
    from common.ml.generate import generate

    if model_name not in _loaded:
        _loaded[model_name] = load_model(checkpoint_dir(model_name))
    tokens = [0]
    start = time.perf_counter()
    generate(_loaded[model_name], [req], max_batch=1,
             on_outputs=lambda outs: tokens.__setitem__(0, tokens[0] + outs[0].tokens_out))
    return time.perf_counter() - start, tokens[0]
