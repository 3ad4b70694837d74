"""Bulk generation through the Batch API vs the same batched generation in-process, and
vs a batch-size-1 loop."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import Figure, Report

N_REQUESTS, MAX_TOKENS, N_B1 = 600, 16, 60


def prompts(n: int) -> list[str]:
    """Prompts of varied length cut from the built-in docs text."""
    from pydoc_data.topics import topics

    words = " ".join(topics.values()).split()
    return [" ".join(words[i * 7 : i * 7 + 2 + i % 24]) for i in range(n)]


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
        uri = session.get(Checkpoint, model.checkpoint_id).uri
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


def through_queue(client: Any, model_name: str, n: int) -> tuple[float, int, int]:
    """(seconds, output lines, tokens out) of a Batch API run, upload to completed."""
    path = Path(tempfile.mkdtemp()) / "batch.jsonl"
    with path.open("w") as f:
        for i, p in enumerate(prompts(n)):
            body = {"model": model_name, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                "url": "/v1/completions", "body": body}) + "\n")
    start = time.perf_counter()
    file = client.upload_file(path)
    batch = client.wait_batch(client.create_batch(file["id"])["id"], poll=0.2)
    seconds = time.perf_counter() - start
    assert batch["status"] == "completed", batch
    lines = client.file_content(batch["output_file_id"]).decode().splitlines()
    tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
                 for line in lines)
    return seconds, len(lines), tokens


def bench_generation(report: Report, client: Any, model_name: str) -> None:
    reqs = requests(N_REQUESTS)
    in_process(model_name, reqs[:20])  # warm-up: first-call allocations
    local_s, local_tokens = in_process(model_name, reqs)
    queue_s, lines, queue_tokens = through_queue(client, model_name, N_REQUESTS)
    assert lines == N_REQUESTS, lines
    report.add(Figure(f"bulk generation through the Batch API ({N_REQUESTS} requests, "
                      f"{MAX_TOKENS} tokens, tiny gpt)", N_REQUESTS / queue_s, "req/s",
                      baseline=N_REQUESTS / local_s, target=0.90,
                      note="in-process common.ml.generate, same requests and batching; "
                           "queue time includes upload, validation, SQL item writes, output file"))
    b1_s, b1_tokens = 0.0, 0
    for r in reqs[:N_B1]:
        s, t = in_process_one(model_name, r)
        b1_s, b1_tokens = b1_s + s, b1_tokens + t
    report.add(Figure("dynamic batching gain: queue tokens/s vs a B=1 loop", queue_tokens / queue_s,
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
