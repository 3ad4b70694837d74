"""A GPU worker through the queue: `genq worker --queues gpu --gpu 0` (skipped without CUDA)."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import start_stack

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_gpu_worker_trains_and_generates_on_cuda(stack, redis_server):
    gpu = start_stack(stack.env["GENQ_DATABASE_URL"], redis_server.rsplit("/", 1)[0] + "/6")
    gpu.api_key = stack.api_key
    try:
        gpu.spawn("g0", [sys.executable, "-m", "api.cli", "worker", "--queues", "gpu",
                         "--gpu", "0", "--name", "g0"])
        gpu.wait_worker("g0")
        c = gpu.client()
        row = next(w for w in c.workers() if w["hostname"].startswith("g0@"))
        assert row["device"]["type"] == "cuda:0" and row["device"].get("name"), row
        job = c.wait(c.create_job({"type": "train", "family": "gpt", "queue": "gpu",
                                   "precision": "bf16", "steps": 20, "batch_size": 8,
                                   "seq_len": 32, "config": {"vocab_size": 300,
                                   "n_positions": 64, "n_embd": 32, "n_layer": 1,
                                   "n_head": 2}})["id"], timeout=300)
        assert job["status"] == "succeeded" and job["worker"].startswith("g0@"), job
        gen = c.wait(c.create_job({"type": "generate", "model": job["result"]["model"],
                                   "queue": "gpu", "prompts": ["a", "bb"], "max_tokens": 4})
                     ["id"], timeout=120)
        assert gen["status"] == "succeeded", gen
    finally:
        gpu.stop_all()
