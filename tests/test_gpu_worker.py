"""A GPU worker through the queue: `genq worker --queues gpu --gpu 0` (skipped without CUDA)."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import BACKENDS, own_stack

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_worker_trains_and_generates_on_cuda(redis_server, backend):
    """On a database and a Redis db of its own: beside the session's database, the session
    worker's reaper could re-queue this stack's jobs on the session's Redis, where that
    worker (it serves gpu too) would run them on the CPU."""
    with own_stack(redis_server, 6, backend) as gpu:
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
