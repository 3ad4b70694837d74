"""Bench plumbing: an embedded stack in a temp folder, timers, and bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

NOTES = """## Reading the figures

- Every run here shares two CPU cores between torch's two threads in the worker and the
  stack around it (API, Redis, the Celery main process, the client), so the queue ratios
  are lower bounds for a machine where the worker has its cores to itself. This machine's
  speed also drifts from minute to minute (the in-process generation baseline alone moved
  between 5.8 and 8.1 s in one hour), so queue and baseline runs are interleaved and the
  best of each is kept.
- Why the worker used to be slower than in-process: CPython 3.11 keeps Python frames in
  16 KiB chunks and frees a chunk when the frame at its base returns (CPython gh-142183,
  fixed in 3.13.x). A Celery task runs some 40 frames deep, and there the generation
  loop's calls straddled a chunk boundary: thousands of mmap/munmap pairs a second, each a
  TLB shootdown that stalled torch's second thread. Job bodies now start on a fresh chunk
  of their own (`worker/frame_stack.py`); the same `generate()` call in the worker went
  from 25-40% slower than a plain process to level with it.
- Training: py-spy on the worker found two per-step costs, now gone. `torch.manual_seed`
  (called every step so dropout depends only on the step) also queues a lazy CUDA seeding
  on CPU, which formats the whole call stack with linecache lookups: 0.45 ms per call 60
  frames deep, 3% of this tiny GPT's step and 40% of a 1.2 ms tiny-LSTM step. GPT-2's
  training forward also filled a KV cache it never read (`use_cache=False` now). The
  queue's own per-step work
  (progress, metrics rows, checkpoints every 50 steps) is about 2% of the samples.
- Generation: shards used to be cut by prompt length in characters (the API held no
  tokenizer). In this data 40% of the prompts are exactly 100 characters long with 11 to 83
  tokens, so ten 1,000-line shards packed into 65 generation batches with 4.6% more padded
  positions than the 63 batches of one in-process call, and took 2-8% longer in-process
  (wall and CPU time). The API now tokenizes a batch's prompts with the checkpoint's
  `tokenizer.json` (tokenizers only, ~0.17 s per 10,000), cuts shards by token count and
  stores the ids, which the worker reuses instead of encoding again (~0.4 s per 10,000
  through transformers' wrapper): the ten shards' `generate()` calls now sum to 3-7% less
  than the one in-process call, which still tokenizes. What is left of the gap (timeline of
  one batch, in-process ~6.3 s): create 0.45 s (parse 0.07 s with orjson, tokenize 0.17 s,
  insert 0.21 s), each of the ten shards ~20 ms of claim/load/finish plus ~10 ms between
  shards, the output file 0.16 s (0.27 s before orjson), and the client's polling, up to
  0.5 s. Model loads in the worker also freeze what is alive out of the cyclic collector:
  a full collection used to walk ~250,000 objects (0.11 s) about once per 10,000 items.
- Minimal-job throughput counts a whole generate job per message (claim, items, progress,
  finish: about a dozen SQL statements) against Celery's no-op; it has no target.
- No GPU was lent to the session that wrote this file, so there are no GPU figures yet.
"""


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline: float | None = None  # the in-process figure it is divided by
    target: float | None = None  # the ratio it should reach
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None

    def row(self) -> str:
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else ""
        target = f"≥ {self.target:g}" if self.target is not None else ""
        ok = "" if self.ratio is None or self.target is None else (
            "yes" if self.ratio >= self.target else "**no**")
        base = f"{self.baseline:.4g}" if self.baseline is not None else ""
        return (f"| {self.name} | {self.value:.4g} {self.unit} | {base} | {ratio} | {target} | "
                f"{ok} | {self.note} |")


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        ratio = f"  ratio {figure.ratio:.2f}" if figure.ratio is not None else ""
        target = f" (target ≥ {figure.target:g})" if figure.target is not None else ""
        base = f" vs {figure.baseline:.4g}" if figure.baseline is not None else ""
        print(f"{figure.name}: {figure.value:.4g} {figure.unit}{base}{ratio}{target}", flush=True)

    def write(self, command: str, seconds: float) -> None:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        lines = [
            "# genq benchmarks",
            "",
            f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            f"- machine: {platform.machine()}, {os.cpu_count()} cores, {device}, "
            f"Python {platform.python_version()}, torch {torch.__version__}",
            f"- command: `{command}` ({seconds:.0f} s)",
            "",
            "Each ratio divides genq's figure by its baseline measured in the same run.",
            "",
            "| figure | genq | baseline | ratio | target | met | note |",
            "|---|---|---|---|---|---|---|",
            *[f.row() for f in self.figures],
            "",
            NOTES,
        ]
        RESULTS.write_text("\n".join(lines))


@contextmanager
def timed() -> Iterator[list[float]]:
    out: list[float] = []
    start = time.perf_counter()
    yield out
    out.append(time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextmanager
def bench_stack() -> Iterator[object]:
    """A fresh embedded stack (Redis, SQLite, API, one CPU worker) in a temp folder."""
    from api.stack import Stack, free_port
    from common.config import Settings, get_settings

    home = Path(tempfile.mkdtemp(prefix="genq-bench-"))
    os.environ.update({
        "GENQ_HOME": str(home), "GENQ_API_PORT": str(free_port()),
        "GENQ_REDIS_PORT": str(free_port()), "GENQ_RATE_LIMIT_PER_MINUTE": "0",
        "GENQ_LOG_LEVEL": "WARNING",
    })
    os.environ.pop("GENQ_DATABASE_URL", None)
    get_settings.cache_clear()
    stack = Stack(Settings(), with_flower=False)
    try:
        stack.start()
        stack.wait_for_worker()
        yield stack
    finally:
        stack.stop()
