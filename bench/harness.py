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
  speed also drifts, by as much as half, from minute to minute, so queue and baseline runs are
  interleaved and the best of each is kept.
- Why the worker used to be slower than in-process (bulk generation at 0.60-0.70 of it):
  CPython 3.11 keeps Python frames in 16 KiB chunks and frees a chunk when the frame at its
  base returns (CPython gh-142183, fixed in 3.13.x). A Celery task runs some 40 frames deep,
  and at that depth the generation loop's calls into the model's modules straddled a chunk
  boundary: strace counted ~2,800 mmap/munmap pairs a second in the worker and none in a
  plain process, and every munmap's TLB shootdown stalled torch's second thread (which is
  why one thread beat two only in the worker). Job bodies now start on a fresh chunk of
  their own (`worker/frame_stack.py`); the same `generate()` call in the worker went from
  25-40% slower than a plain process to level with it, and the training ratio rose too.
- What is left of the generation gap: the queue's own bookkeeping on the same two cores
  (validating and inserting the 10,000 lines, about 0.3-0.5 s; writing the output file,
  about 0.3 s; the client's 0.5 s status polling; each shard loading its items and
  committing results), and a part not yet explained. In interleaved A/B runs of 1,000
  requests (6-8 rounds) a generate job, a one-shard batch and the in-process call took the
  same median time; inside a 10,000-line batch the ten shards' `generate()` calls summed to
  8% less to 49% more (median 12% more, over eight batches) than the same ten calls
  in-process. This session's machine was noisy (the
  in-process baseline alone ranged 8.3-15 s between runs), so the end-to-end ratio moved
  between 0.69 and 0.88 from one `make bench` to the next, and training between 0.82 and
  1.03.
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
