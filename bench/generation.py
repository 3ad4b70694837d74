"""Bulk generation through the Batch API (driven by the official `openai` SDK) vs the same
batched generation in-process, and vs a batch-size-1 loop."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.harness import Figure, Report, median, paired

N_REQUESTS, N_WARMUP, MAX_TOKENS, N_B1 = 10_000, 200, 16, 60
ROUNDS, BUDGET_S = 10, 240  # rounds stop early past the budget (a slow machine)
HOLD_S = 60  # a held retrieve (?wait=): the API answers as soon as the batch has finished


def prompts(n: int) -> list[str]:
    """Prompts of varied length (2 to 25 words) cut from the built-in docs text."""
    from pydoc_data.topics import topics

    words = " ".join(topics.values()).split()
    return [" ".join(words[(i * 7) % 50_000 : (i * 7) % 50_000 + 2 + i % 24])[:100]
            for i in range(n)]


def requests(n: int, max_tokens: int = MAX_TOKENS) -> list[Any]:
    from common.ml.generate import GenRequest

    return [GenRequest(key=str(i), prompt=p, max_tokens=max_tokens, temperature=0.0)
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


def in_process(model_name: str, reqs: list[Any], device: str = "cpu") -> tuple[float, int]:
    """(seconds, tokens out) of common.ml.generate on the same requests and token budget, with
    the weights in the dtype a worker on that device uses."""
    from common.config import get_settings
    from common.ml.checkpoint import load_model
    from common.ml.generate import generate
    from worker.device import inference_dtype

    loaded = load_model(checkpoint_dir(model_name), device, inference_dtype(device))
    tokens = [0]

    def count(outs: list[Any]) -> None:
        tokens[0] += sum(o.tokens_out for o in outs)

    synchronize(device)
    start = time.perf_counter()
    generate(loaded, reqs, token_budget=get_settings().token_budget, on_outputs=count)
    synchronize(device)
    return time.perf_counter() - start, tokens[0]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def batch_file(model_name: str, n: int, max_tokens: int = MAX_TOKENS) -> Path:
    path = Path(tempfile.mkdtemp(prefix="genq-bench-")) / f"batch-{n}.jsonl"
    with path.open("w") as f:
        for i, p in enumerate(prompts(n)):
            body = {"model": model_name, "prompt": p, "max_tokens": max_tokens, "temperature": 0}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                "url": "/v1/completions", "body": body}) + "\n")
    return path


def through_sdk(sdk: Any, model_name: str, n: int,
                max_tokens: int = MAX_TOKENS) -> tuple[float, int]:
    """(seconds, tokens out) of upload → create → held retrieve → download with the openai SDK.

    Checks the output holds every custom_id exactly once.
    """
    from common.batches.schemas import BATCH_FINISHED, BatchStatus

    path = batch_file(model_name, n, max_tokens)
    start = time.perf_counter()
    with path.open("rb") as f:
        upload = sdk.files.create(file=f, purpose="batch")
    shutil.rmtree(path.parent)
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/completions",
                               completion_window="24h")
    while batch.status not in BATCH_FINISHED:
        batch = sdk.batches.retrieve(batch.id, extra_query={"wait": HOLD_S}, timeout=HOLD_S + 30)
    assert batch.status == BatchStatus.completed and batch.output_file_id, batch
    ids, tokens = [], 0
    with sdk.files.with_streaming_response.content(batch.output_file_id) as response:
        for line in response.iter_lines():  # a million lines are some 400 MB: not at once
            if line:
                row = orjson.loads(line)
                ids.append(row["custom_id"])
                tokens += row["response"]["body"]["usage"]["completion_tokens"]
    seconds = time.perf_counter() - start
    assert len(ids) == n and set(ids) == {f"r{i}" for i in range(n)}, (len(ids), len(set(ids)))
    assert batch.request_counts.completed == n, batch.request_counts
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
                                  lambda: N_REQUESTS / in_process(model_name, reqs)[0],
                                  budget_s=BUDGET_S)
    report.add(Figure(f"bulk generation through the Batch API ({N_REQUESTS:,} requests, "
                      f"{MAX_TOKENS} tokens, tiny gpt, openai SDK)", queue, "req/s",
                      baseline=local, target=0.90, rounds=rounds,
                      note="in-process common.ml.generate, same requests and batching; the "
                           "queue's time runs from upload to the downloaded output file "
                           f"(a retrieve held with ?wait={HOLD_S} answers when the batch "
                           f"completes), which held all {N_REQUESTS:,} custom_ids once each"))
    report.add(Figure("dynamic batching gain: queue tokens/s vs a B=1 loop", median(tokens),
                      "tok/s", baseline=b1_tokens_per_s(model_name, reqs[:N_B1]), target=8.0,
                      note=f"B=1 loop over {N_B1} of the same requests, in-process"))


def b1_tokens_per_s(model_name: str, reqs: list[Any], device: str = "cpu") -> float:
    """Generated tokens/s of one generate() call per request (no batching), in-process."""
    from common.ml.checkpoint import load_model
    from common.ml.generate import generate
    from worker.device import inference_dtype

    loaded = load_model(checkpoint_dir(model_name), device, inference_dtype(device))
    tokens = [0]

    def count(outs: list[Any]) -> None:
        tokens[0] += sum(o.tokens_out for o in outs)

    generate(loaded, reqs[:1], max_batch=1, on_outputs=lambda outs: None)  # first-call costs
    synchronize(device)
    start = time.perf_counter()
    for r in reqs:
        generate(loaded, [r], max_batch=1, on_outputs=count)
    synchronize(device)
    return tokens[0] / (time.perf_counter() - start)
