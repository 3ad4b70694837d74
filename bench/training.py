"""Training through the queue vs a bare PyTorch loop; checkpoint save/load and resume times."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from bench.harness import Figure, Report, paired, scratch_dir

GPT = {"vocab_size": 512, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 2}
STEPS, BATCH, SEQ, LOG_EVERY = 400, 16, 64, 10
ROUNDS, BUDGET_S = 8, 150  # rounds stop early past the budget (a slow machine)


@dataclass(frozen=True)
class TrainRun:
    """One model and batch, trained the same way through the queue and in the bare loop."""

    config: dict[str, Any] = field(default_factory=lambda: dict(GPT))
    steps: int = STEPS
    batch: int = BATCH
    seq: int = SEQ
    lr: float = 3e-3
    precision: str = "fp32"  # bf16 / fp16 autocast on CUDA, as common/ml/train.py does
    device: str = "cpu"
    queue: str = "cpu"
    adapter: dict[str, Any] | None = None  # a LoRA adapter spec: only its matrices train


LORA = TrainRun(config={**GPT, "n_embd": 128, "n_layer": 4, "n_head": 4},
                adapter={"r": 8, "alpha": 16, "target_modules": ["c_attn"]})


def train_spec(name: str, run: TrainRun = TrainRun()) -> dict[str, Any]:
    spec = {"type": "train", "family": "gpt", "name": name, "config": run.config,
            "steps": run.steps, "batch_size": run.batch, "seq_len": run.seq,
            "log_every": LOG_EVERY, "lr": run.lr, "precision": run.precision,
            "queue": run.queue}
    return {**spec, "adapter": run.adapter} if run.adapter else spec


def queue_steps_per_s(client: Any, job_id: str) -> float:
    """Steady-state steps/s from the logged metrics (checkpoints at the default interval count)."""
    points = client.metrics(job_id, ["loss"])
    first, last = points[0], points[-1]
    at = datetime.fromisoformat
    seconds = (at(last["at"]) - at(first["at"])).total_seconds()
    return (last["step"] - first["step"]) / seconds


def bare_steps_per_s(run: TrainRun = TrainRun()) -> float:
    """The same model, data and batch in a plain loop: forward, backward, clip, AdamW."""
    from common.ml.data import TextData, load_data
    from common.ml.families import TextFamily, get_family
    from common.ml.train import Batches, on_helper_thread

    module = get_family("gpt")
    assert isinstance(module, TextFamily)
    data = load_data({"builtin": "python-docs"}, "text")
    assert isinstance(data, TextData)
    cfg, tok = module.prepare(module.Config(**run.config), data)
    torch.manual_seed(0)
    model = module.build_model(cfg, tok).to(run.device)
    # tokenized as genq's training does it (off the main thread's malloc arena), so this
    # process's later in-process baselines start from the same heap as the worker's
    tokens = torch.tensor(on_helper_thread(module.encode, tok, data.text), dtype=torch.long)
    batches = Batches(data, tokens, run.batch, run.seq, 0, run.device)
    if run.adapter:  # the plain peft recipe: wrap, then optimise what is left trainable
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=run.adapter["r"], lora_alpha=run.adapter["alpha"],
            target_modules=run.adapter["target_modules"], fan_in_fan_out=True))  # GPT-2 Conv1D
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=run.lr)
    phase = module.PHASES[0]
    cuda = run.device.startswith("cuda")
    autocast: Any = contextlib.nullcontext
    if cuda and run.precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if run.precision == "bf16" else torch.float16
        autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    start = 0.0
    for step in range(run.steps):
        if step == LOG_EVERY:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast():
            loss, _ = module.loss(model, batches(step), phase)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    return (run.steps - LOG_EVERY) / (time.perf_counter() - start)


def bench_training(report: Report, client: Any) -> dict[str, Any]:
    """Train the tiny GPT through the queue (it also serves the generation benches)."""
    jobs: list[dict[str, Any]] = []

    def queue_rate() -> float:
        name = f"bench-gpt-{int(time.time())}-{len(jobs)}"
        job = client.wait(client.create_job(train_spec(name))["id"])
        assert job["status"] == "succeeded", job
        jobs.append(job)
        return queue_steps_per_s(client, job["id"])

    queue, bare, rounds = paired(ROUNDS, queue_rate, bare_steps_per_s, budget_s=BUDGET_S)
    report.add(Figure("training steps/s through the queue (tiny gpt, B=16, T=64)", queue,
                      "steps/s", baseline=bare, target=0.95, rounds=rounds,
                      note="bare PyTorch loop, same model/batch; checkpoints every 50 steps"))
    return jobs[0]


def bench_lora_training(report: Report, client: Any, run: TrainRun = LORA,
                        rounds: int = ROUNDS) -> None:
    """LoRA fine-tuning through the queue vs the same peft model in a bare loop."""
    made: list[str] = []

    def queue_rate() -> float:
        name = f"bench-lora-{int(time.time())}-{len(made)}"
        job = client.wait(client.create_job(train_spec(name, run))["id"])
        assert job["status"] == "succeeded", job
        made.append(job["id"])
        return queue_steps_per_s(client, job["id"])

    queue, bare, per_round = paired(rounds, queue_rate, lambda: bare_steps_per_s(run),
                                    budget_s=BUDGET_S, min_rounds=min(4, rounds))
    rank = (run.adapter or {}).get("r")
    shape = f"gpt {run.config['n_layer']}x{run.config['n_embd']}, r={rank}, B={run.batch}, " \
            f"T={run.seq}"
    report.add(Figure(f"LoRA training steps/s through the queue ({shape})", queue, "steps/s",
                      baseline=bare, target=0.95, rounds=per_round,
                      note="bare peft loop (get_peft_model, AdamW on the adapter), same base, "
                           "data and batch"))


def bench_checkpoints(report: Report) -> None:
    """Save/load of a safetensors checkpoint and time from resume to the first step."""
    with scratch_dir("genq-bench-ckpt-") as work:
        _bench_checkpoints(report, work)


def _bench_checkpoints(report: Report, work: Path) -> None:
    from common.ml.checkpoint import load_model, load_train_state, save_checkpoint
    from common.ml.train import TrainHooks, run_training

    spec = {"family": "gpt", "config": {**GPT, "n_embd": 256, "n_layer": 4, "n_head": 4},
            "data": {"builtin": "python-docs"}, "steps": 2, "batch_size": 4, "seq_len": 32,
            "checkpoint_every": 1000}
    outcome = run_training(spec, work / "a", hooks=TrainHooks())
    ckpt = outcome.checkpoint
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    loads = []
    for _ in range(3):
        t = time.perf_counter()
        loaded = load_model(ckpt)
        loads.append(time.perf_counter() - t)
    state = load_train_state(ckpt)
    saves = []
    for i in range(3):  # what a training checkpoint writes: weights, AdamW state, tokenizer
        t = time.perf_counter()
        save_checkpoint(work / f"save-{i}", family="gpt", config=loaded.config,
                        model=loaded.model, tokenizer_or_none=loaded.tokenizer,
                        train_state=state, metrics={"step": 2})
        saves.append(time.perf_counter() - t)
    first: dict[str, float] = {}
    t0 = time.perf_counter()

    def on_progress(step: int, total: int, metrics: dict[str, float]) -> None:
        first.setdefault("t", time.perf_counter() - t0)

    run_training({**spec, "steps": 3}, work / "b", hooks=TrainHooks(on_progress=on_progress),
                 resume_from=ckpt)
    mb = size / 1e6
    report.add(Figure(f"checkpoint save (gpt {mb:.1f} MB, safetensors)", min(saves) * 1000, "ms",
                      note="weights, AdamW state and tokenizer to a temp dir, then renamed into "
                           "place; best of 3"))
    report.add(Figure(f"checkpoint load (gpt {mb:.1f} MB, safetensors)", min(loads) * 1000, "ms",
                      note="weights and tokenizer, ready to generate; best of 3"))
    report.add(Figure("resume to first step (same checkpoint)", first.get("t", math.nan) * 1000,
                      "ms", note="load weights + optimizer/RNG state + data, one step"))
