"""Bench plumbing: an embedded stack in a temp folder, timers, and bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

NOTES = """## Reading the figures

- Every run here shares two CPU cores between torch's two threads in the worker and the
  stack around it (API, Redis, the Celery main process, the client), so the queue ratios
  are lower bounds for a machine where the worker has its cores to itself. This machine's
  speed also drifts by 20-40% over minutes (the in-process generation of 10,000 requests
  took 3.6 s in one run and 5.8 s twenty minutes later). The queue-vs-in-process ratios
  are therefore the median of paired rounds, each running genq and its baseline back to
  back in alternating order, and every round's ratio is listed. The best of each side,
  the method before, could pair a fast minute of one side with slow ones of the other.
  Even so, whole runs differ: five `make bench` runs within an hour, with unchanged
  training code, gave training medians of 0.96, 0.94, 1.00, 0.97 and 0.88 (single rounds
  from 0.75 to 1.29); bulk generation's ranged from 0.85 to 0.895 (with small changes to
  the queue between runs). Read one run's medians to about ±0.05.
- glibc malloc: a process that never freed a large block serves every tensor of 128 KiB
  or more with its own mmap and munmap; glibc raises that threshold only after such a
  free, which training does. In-process generation of 4,000 requests took 2.2-2.6 s in a
  fresh process, 1.7-2.1 s after training in that process, and 1.5-1.9 s with the
  thresholds set at start. The worker's pool child now sets them where glibc would raise
  them (`worker/malloc.py`), and this bench sets the same in its own process, so neither
  side depends on what ran before it.
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
  tokens, so ten 1,000-line shards packed worse than one in-process call. The API now
  tokenizes a batch's prompts with the checkpoint's `tokenizer.json` (tokenizers only,
  0.08-0.2 s per 10,000), cuts shards by token count and stores the ids, which the worker
  reuses instead of encoding again: in one process, the ten shards' `generate()` calls on
  those ids take 10-15% less time than the one in-process call, which still tokenizes.
- Where the queue's time goes (one 10,000-request batch; on a slow afternoon the same
  work took 6-7 s in-process, and these parts grow with it): upload 0.02 s; create
  0.34-0.46 s to the first shard's start (parse and validate 0.07 s, tokenize 0.13-0.22 s
  in `tokenizers`' own batch encoder, insert ~0.12 s; it was 0.45-0.58 s on a fast morning
  before JSON columns went through orjson and the cyclic collector was held off during a
  create); in the worker's pool child, py-spy put 93% of the samples in the model's
  forward, ~2% in item writes, ~1.3% in finishing shards, ~1% in the output file and
  ~0.6% in loading items; then the client's next poll (every 0.5 s: 0.25 s on average)
  and the download. Gaps between shards are ~5 ms. Both sides run torch's two threads
  flat out (the worker's pool child used 1.76 cores over the queue's whole run, the
  in-process call 1.92 over its own), so whatever else runs, the API's 0.5-0.7 s of CPU
  per batch above all, takes a core from them. That leaves the queue 10-15% behind,
  short of the 0.90 target on this machine. The upload and the poll do not grow with the
  batch; the create, the per-shard work and the output file do.
- Polls: a running batch's request counts used to be counted row by row over all its
  items (13 ms a retrieve for 20,000 lines while the worker ran). A finished shard now
  keeps its counts, so a poll counts rows only in shards under way (4 ms).
- Model loads in the worker also freeze what is alive out of the cyclic collector: a full
  collection used to walk ~250,000 objects (0.11 s) about once per 10,000 items.
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
    rounds: list[float] | None = None  # per-round ratios of a paired() run: its median is the ratio

    @property
    def ratio(self) -> float | None:
        if self.rounds:
            return median(self.rounds)
        return self.value / self.baseline if self.baseline else None

    def ratio_text(self) -> str:
        """Two decimals, or three where two would round across the target (0.895 of 0.9)."""
        if self.ratio is None:
            return ""
        text = f"{self.ratio:.2f}"
        if self.target is not None and (float(text) >= self.target) != (self.ratio >= self.target):
            text = f"{self.ratio:.3f}"
        return text

    def row(self) -> str:
        ratio = self.ratio_text()
        target = f"≥ {self.target:g}" if self.target is not None else ""
        ok = "" if self.ratio is None or self.target is None else (
            "yes" if self.ratio >= self.target else "**no**")
        base = f"{self.baseline:.4g}" if self.baseline is not None else ""
        note = self.note
        if self.rounds:
            note += (f"; median of {len(self.rounds)} rounds, each genq and baseline back to "
                     f"back (order alternating), per-round ratios "
                     f"{', '.join(f'{r:.2f}' for r in sorted(self.rounds))}")
        return (f"| {self.name} | {self.value:.4g} {self.unit} | {base} | {ratio} | {target} | "
                f"{ok} | {note} |")


@dataclass
class Report:
    """The figures of one section of RESULTS.md (cpu or gpu), as one run measured them."""

    section: str = "cpu"
    figures: list[Figure] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        ratio = f"  ratio {figure.ratio_text()}" if figure.ratio is not None else ""
        target = f" (target ≥ {figure.target:g})" if figure.target is not None else ""
        base = f" vs {figure.baseline:.4g}" if figure.baseline is not None else ""
        print(f"{figure.name}: {figure.value:.4g} {figure.unit}{base}{ratio}{target}", flush=True)

    def text(self, command: str) -> str:
        import torch

        gpu = self.section == "gpu" and torch.cuda.is_available()
        device = torch.cuda.get_device_name(0) if gpu else "CPU"
        return "\n".join([
            f"## {self.section.upper()}",
            "",
            f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            f"- machine: {platform.machine()}, {os.cpu_count()} cores, {device}, "
            f"Python {platform.python_version()}, torch {torch.__version__}",
            f"- command: `{command}` ({self.seconds:.0f} s for this section)",
            "",
            "| figure | genq | baseline | ratio | target | met | note |",
            "|---|---|---|---|---|---|---|",
            *[f.row() for f in self.figures],
        ])


NO_GPU = ("## GPU\n\nNo GPU was lent to the runs that wrote this file. `make bench` adds this "
          "section where CUDA is present (`python -m bench --only gpu` runs it alone).")


def write_results(reports: list[Report], command: str) -> None:
    """Rewrite the sections these reports measured; keep the other section as it was."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    blocks = {}
    for name in ("cpu", "gpu"):
        found = re.search(f"<!-- {name} -->\n(.*?)\n<!-- /{name} -->", old, re.S)
        blocks[name] = found.group(1) if found else (NO_GPU if name == "gpu" else "")
    for report in reports:
        blocks[report.section] = report.text(command)
    RESULTS.write_text("\n".join([
        "# genq benchmarks",
        "",
        "Each ratio divides genq's figure by its baseline measured in the same run. "
        "`make bench` measures the CPU section, and the GPU section where CUDA is present; "
        "`python -m bench --only cpu|gpu` measures one and keeps the other as it was.",
        "",
        *[f"<!-- {name} -->\n{blocks[name]}\n<!-- /{name} -->\n" for name in ("cpu", "gpu")],
        NOTES,
    ]))


def paired(rounds: int, genq: Callable[[], float], baseline: Callable[[], float], *,
           budget_s: float | None = None, min_rounds: int = 4,
           ) -> tuple[float, float, list[float]]:
    """Run genq and its baseline back to back up to `rounds` times, alternating which goes
    first; past `budget_s` seconds, stop after the next even round (at least min_rounds).

    Both return a rate (higher is better). Returns the median of each and the per-round
    ratios. This machine's speed drifts by 20-40% over minutes: the best of each side can
    pair a fast minute on one side with slow ones on the other, while a round's two runs
    share their minute and the alternating order cancels a steady drift within it.
    """
    ours: list[float] = []
    theirs: list[float] = []
    start = time.perf_counter()
    for n in range(rounds):
        over = budget_s is not None and time.perf_counter() - start > budget_s
        if over and n >= min_rounds and n % 2 == 0:
            print(f"  stopped after {n} rounds: past the {budget_s:.0f} s budget", flush=True)
            break
        if n % 2:
            theirs.append(baseline())
            ours.append(genq())
        else:
            ours.append(genq())
            theirs.append(baseline())
        print(f"  round {n + 1}: genq {ours[-1]:.4g} baseline {theirs[-1]:.4g} "
              f"ratio {ours[-1] / theirs[-1]:.3f}", flush=True)
    return (median(ours), median(theirs),
            [a / b for a, b in zip(ours, theirs, strict=True)])


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
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temp folder for one benchmark, removed after it (a stack's home holds ~100 MB)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def bench_stack(gpus: int = 0) -> Iterator[object]:
    """A fresh embedded stack (Redis, SQLite, API, one CPU worker and `gpus` GPU workers) in
    a temp folder."""
    from api.stack import Stack, free_port
    from common.config import Settings, get_settings

    with scratch_dir("genq-bench-") as home:
        os.environ.update({
            "GENQ_HOME": str(home), "GENQ_API_PORT": str(free_port()),
            "GENQ_REDIS_PORT": str(free_port()), "GENQ_RATE_LIMIT_PER_MINUTE": "0",
            "GENQ_LOG_LEVEL": "WARNING",
        })
        os.environ.pop("GENQ_DATABASE_URL", None)
        get_settings.cache_clear()
        stack = Stack(Settings(), gpus=gpus, with_flower=False)
        try:
            stack.start()
            stack.wait_for_worker(gpu=gpus > 0)
            yield stack
        finally:
            stack.stop()
