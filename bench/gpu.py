"""GPU figures, run when CUDA is present: a GPT-2-small-shaped model (124M parameters at
GPT-2's vocabulary; from config) trained in bf16 and generating on a GPU worker, each
against the same work in-process, with model FLOPs utilisation and generated tokens/s."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bench.generation import b1_tokens_per_s, in_process, requests, through_sdk
from bench.harness import Figure, Report, median, paired
from bench.training import TrainRun, bare_steps_per_s, queue_steps_per_s, train_spec

GPT2_SMALL = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
              "n_head": 12}

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12}


@dataclass(frozen=True)
class GpuSizes:
    """What the GPU section runs; small enough for a few minutes of a lent GPU."""

    train: TrainRun = field(default_factory=lambda: TrainRun(
        config=dict(GPT2_SMALL), steps=120, batch=16, seq=512, lr=3e-4, precision="bf16",
        device="cuda", queue="gpu"))
    train_rounds: int = 3
    gen_requests: int = 1024
    gen_tokens: int = 64
    gen_rounds: int = 3
    b1_requests: int = 16


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def train_flops_per_token(n_params: int, config: dict[str, Any], seq: int) -> float:
    """6N for the weights' forward and backward, plus attention's 12·layers·width·T (PaLM)."""
    return 6 * n_params + 12 * config["n_layer"] * config["n_embd"] * seq


def bench_gpu(report: Report, client: Any, sdk: Any, sizes: GpuSizes = GpuSizes()) -> None:
    """Training and bulk generation on the GPU worker vs in-process on the same device."""
    from bench.generation import checkpoint_dir
    from common.ml.checkpoint import load_model

    run = sizes.train
    device_name = _device_name(run.device)
    jobs: list[dict[str, Any]] = []

    def queue_rate() -> float:
        name = f"bench-gpu-{int(time.time())}-{len(jobs)}"
        job = client.wait(client.create_job(train_spec(name, run))["id"])
        assert job["status"] == "succeeded", job
        jobs.append(job)
        return queue_steps_per_s(client, job["id"])

    queue, bare, rounds = paired(sizes.train_rounds, queue_rate, lambda: bare_steps_per_s(run),
                                 min_rounds=1)
    model = jobs[0]["result"]["model"]
    n_params = sum(p.numel() for p in load_model(checkpoint_dir(model)).model.parameters())
    tokens_per_step = run.batch * run.seq
    flops = train_flops_per_token(n_params, run.config, run.seq) * tokens_per_step
    peak = peak_flops(device_name)
    shape = (f"{n_params / 1e6:.0f}M-parameter GPT-2-small shape, {run.precision}, "
             f"B={run.batch}, T={run.seq}, {device_name}")
    report.add(Figure(f"GPU training steps/s through the queue ({shape})", queue, "steps/s",
                      baseline=bare, target=0.95, rounds=rounds,
                      note=f"bare PyTorch loop, same model/batch/autocast; checkpoints at the "
                           f"default interval; {queue * tokens_per_step:,.0f} tokens/s"))
    for who, rate in (("through the queue", queue), ("bare loop", bare)):
        achieved = flops * rate
        mfu = f"{100 * achieved / peak:.1f}" if peak else "n/a"
        report.add(Figure(f"GPU training model FLOPs utilisation, {who} ({device_name})",
                          achieved / 1e12, "TFLOP/s",
                          note=f"MFU {mfu}% of the {peak / 1e12:.0f} TFLOP/s bf16 peak"
                               if peak else "no peak known for this GPU"))

    reqs = requests(sizes.gen_requests, sizes.gen_tokens)
    warm = min(64, sizes.gen_requests)
    in_process(model, reqs[:warm], run.device)  # warm-up: kernels, allocator
    through_sdk(sdk, model, warm, sizes.gen_tokens)  # warm-up: the worker's model cache
    tokens: list[float] = []

    def gen_queue() -> float:
        seconds, out = through_sdk(sdk, model, sizes.gen_requests, sizes.gen_tokens)
        tokens.append(out / seconds)
        return sizes.gen_requests / seconds

    gen_q, gen_local, gen_rounds = paired(
        sizes.gen_rounds, gen_queue,
        lambda: sizes.gen_requests / in_process(model, reqs, run.device)[0], min_rounds=1)
    report.add(Figure(f"GPU bulk generation through the Batch API ({sizes.gen_requests:,} "
                      f"requests, {sizes.gen_tokens} tokens, {shape.split(', B=')[0]})",
                      gen_q, "req/s", baseline=gen_local, target=0.95, rounds=gen_rounds,
                      note="in-process common.ml.generate on the same GPU, weights in the "
                           "worker's GENQ_GPU_DTYPE; upload to downloaded output file"))
    report.add(Figure(f"GPU generated tokens/s through the queue vs a B=1 loop ({device_name})",
                      median(tokens), "tok/s",
                      baseline=b1_tokens_per_s(model, reqs[:sizes.b1_requests], run.device),
                      note=f"B=1 loop over {sizes.b1_requests} of the same requests, in-process"))


def _device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return device
    import torch

    return str(torch.cuda.get_device_name(0))
