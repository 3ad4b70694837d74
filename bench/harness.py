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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from api.stack import Stack

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

NOTES = """## Reading the figures

- Every CPU run here shares two cores between torch's two threads in the worker and the
  stack around it (API, Redis, the Celery main process, the client), so the queue ratios
  are lower bounds for a machine where the worker has its cores to itself. This machine's
  speed also drifts by a factor of two over minutes (the same in-process generation of
  10,000 requests took 7.4 s and 16.7 s on one day). The queue-vs-in-process ratios are
  therefore the median of paired rounds, each running genq and its baseline back to back
  in alternating order, and every round's ratio is listed. Even so, whole runs differ:
  read one run's medians to about ±0.05.
- The client waits for a batch with a held retrieve (`GET /v1/batches/{id}?wait=60`,
  through the SDK's `extra_query`): the API answers when the last shard's finish notice
  arrives (Redis pub/sub), within about 10 ms of the batch completing. The bench used to
  poll every 0.5 s, which added 0.25 s on average to the queue's side.
- Where the queue's time goes (one 10,000-request batch, 2026-12-08, in-process 6.3 s;
  times from the jobs' rows): the create answers at once and the prepare job runs 0.57-0.65
  s (checking every line ~0.2 s, tokenizing ~0.2 s in `tokenizers`' batch encoder, writing
  the items ~0.1 s, the shard cut, its commit; it was 0.8 s while a file of one window was
  read and checked twice and each request built a model for its packing key); the ten
  shards 6.4 s back to back (gaps 10-20 ms; py-spy in the pool child: 86 % of a shard in
  the model's forward, 9 % in the rest of generation, about 5 % the queue's own reads and
  writes); the output file ~0.14 s. The shards skip tokenizing, which the in-process call
  does (~10 % of its samples encode prompts). Before 2026-12-07 the API did the prepare
  job's work in the create (0.55-0.65 s to the first shard's start).
- Training left the worker slow to generate (found 2026-12-02). The bench trains before it
  generates, in the same pool child, and the ten shards then ran 5.7-6.05 s where their
  requests (read back from SQL, already tokenized) took 4.8-5.1 s through `generate()` in
  the bench process. Probed inside the child at a task's start, before any of genq's own
  task code, the same ten shards took 5.7-5.9 s in a child that had trained and 5.2-5.3 s
  in a fresh child of the same worker, against 4.9-5.2 s in a fresh Python started beside
  it. The same happens in one plain process: after `run_training`, generation is 7-12%
  slower, not with jemalloc preloaded, and the step that does it is tokenizing the
  training text in one `encode` call: its hundreds of thousands of small allocations and
  frees leave glibc's main heap in some 12,000 free pieces (about 1,000 before), and the
  tensors a process allocates afterwards come from that heap (see the malloc note below),
  slower by that much; perf showed `_int_malloc` at 3% of samples, and cProfile every
  function a little slower. Training now tokenizes on a short-lived helper thread
  (`common/ml/train.py`, `on_helper_thread`), whose malloc arena takes the pieces: a child
  that trained then generates as fast as a fresh one (5.05-5.1 s against 4.95-5.1 s). The
  `make bench` run after the change put bulk generation at 0.93 (0.89-0.96 per round; 0.86
  the day before). The bench's bare training loop tokenizes the same way, so its
  in-process baselines start from the same heap. Ruled out on the way, each inside the
  child: the heartbeat thread, the cyclic collector, `malloc_trim`, freshly loaded
  weights, the frame-stack chunk, transparent huge pages, denormals, environment, thread
  count and affinity, logging, the GIL's switch interval; a plain Celery prefork child
  computes as fast as a fresh process. (An earlier note here said the pool child was not
  slower: it had measured a child that never trained.)
- glibc malloc: a process that never freed a large block serves every tensor of 128 KiB
  or more with its own mmap and munmap; glibc raises that threshold only after such a
  free, which training does. The worker's pool child sets the thresholds where glibc would
  raise them (`worker/malloc.py`), and this bench sets the same in its own process, so
  neither side depends on what ran before it (in-process generation of 4,000 requests:
  2.2-2.6 s in a fresh process, 1.5-1.9 s with the thresholds set).
- CPython 3.11 keeps Python frames in 16 KiB chunks and frees a chunk when the frame at
  its base returns (CPython gh-142183, fixed in 3.13.x). A Celery task runs some 40 frames
  deep, and there the generation loop's calls used to straddle a chunk boundary: thousands
  of mmap/munmap pairs a second, each a TLB shootdown that stalled torch's second thread.
  Job bodies start on a fresh chunk of their own (`worker/frame_stack.py`); strace shows
  no mmap/munmap in the pool child while a shard generates.
- Training: `torch.manual_seed` (called every step so dropout depends only on the step)
  also queues a lazy CUDA seeding on CPU that formats the whole call stack; genq seeds
  CUDA only where a job computes. GPT-2's training forward skips the KV cache. The
  queue's own per-step work (progress, metrics rows, checkpoints every 50 steps) is about
  2% of the samples.
- Polls of a running batch count items only in shards under way (a finished shard keeps
  its counts): 4 ms for a 20,000-line batch. Model loads in the worker freeze what is
  alive out of the cyclic collector.
- Queue overhead (issue 23). A 1-token generate job costs the worker 4 SQL statements in 2
  transactions (before: 12 in 7 — the claim and two re-reads of the row, the worker's
  current job set and cleared, the last heartbeat and flag read, the finish, a re-read and
  a quota lookup — and a thread and two sessions a job) and the API 7 in 3 (before: 8).
  Back to back on 2026-12-07 (the table's run, then the code before the cuts with the same
  bench), before → after: SQLite 101 → 151 jobs/s (0.12 → 0.18 of raw Celery's no-op; 0.29
  → 0.46 of raw Celery running the job's request), PostgreSQL 79 → 137 jobs/s (0.09 → 0.16;
  0.24 → 0.41); an earlier pair at a higher load: SQLite 67 → 119, PostgreSQL 33 → 71
  jobs/s. The CPU section's row before the cuts (27 jobs/s, 0.08) created jobs one at a
  time, waited for each, and ran torch on two threads. On 2026-12-08 the API's create went
  from 5.8-6.2 to 4.9-5.1 ms of CPU a job (two back-to-back pairs of the same bench, before
  and after): each request had built a sessionmaker, with its event dispatch, and run its
  session dependency's start and end on FastAPI's threadpool; there is now one sessionmaker
  per engine and the dependency is async (it closes on the threadpool only while a
  transaction is open). uvicorn's C parts (`uvicorn[standard]`: httptools, uvloop) took
  about 0.4 ms more off (5.4-5.5 -> 5.0-5.15, two pairs). The table's "CPU per minimal job"
  rows say where a job's CPU goes, process by process. What bounds the throughput is the
  worker's serial path: it runs one job at a time (prefork concurrency 1, DESIGN.md), and
  every job is one Celery message, so each costs the pool child's work (claim, model call,
  items and finish: 4.85 ms of CPU on SQLite, 5.75 on PostgreSQL) plus the message's own
  cycle in the main process (ack, fetch of the next, hand-over to the child), which is all
  a raw no-op's cycle is (about 2.3 ms in this run: 440/s). Half the no-op's rate would
  leave the pool child about 2.3 ms a job, and transformers' generate for one token (1.5-2
  ms) with the job's SQL (about 1 ms) is already past it. Against raw Celery running the
  same model call genq is at 0.51 (SQLite) and 0.40 (PostgreSQL). Two changes could reach
  0.5 of the no-op, neither done: a pool child that claims the other queued small jobs of
  the same model with its own and generates them as one batch (their messages then each
  cost a dropped claim, not a model call), and a create cheaper than the API's ~5 ms, which
  caps one API process at about 200 jobs/s. On PostgreSQL every connection checkout also
  pings (`pool_pre_ping`, what carries the processes across a database restart), once for
  each transaction of a create or a job. With prefetch 1 and late acks the worker fetches
  the next message only after the ack; a larger prefetch would hide that but hold a second
  message behind a long job and ahead of a later urgent one (README: Priorities), so it
  stays 1. With torch's default two threads the same jobs ran about half as fast (each op
  of a 1-token forward waited for the second thread on the loaded cores), hence
  GENQ_TORCH_THREADS=1 for this section's worker. (Issue 22 asked that scheduling keep this
  figure within 10 % of before: on 2026-12-04 it ran 42 and 38 jobs/s with it against 39
  and 31 without.)
- The scale section (a million lines, about four minutes a database) is as sensitive to
  other work on the machine as the rest: a run during which another benchmark used the
  cores put SQLite's ratio at 0.56, one beside a test suite at 0.68; the table's figures
  come from a run with the machine otherwise idle. Shards took the same time early and
  late in the million-line batch (about 0.18 s for 1,024 requests; py-spy in the pool
  child: about 80 % of a shard in the model, 1 % in SQL); the slow shards of the loaded
  runs were the model's forward passes waiting for a core.
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
    target_on_value: bool = False  # the target applies to the value itself (a share, a score)
    at_most: bool = False  # the target is a ceiling (a memory ratio), not a floor

    @property
    def scored(self) -> float | None:
        """What the target is compared with: the ratio, or the value itself."""
        return self.value if self.target_on_value else self.ratio

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
        if (self.target is not None and not self.target_on_value
                and self.met(float(text)) != self.met(self.ratio)):
            text = f"{self.ratio:.3f}"
        return text

    def met(self, scored: float) -> bool:
        assert self.target is not None
        return scored <= self.target if self.at_most else scored >= self.target

    def row(self) -> str:
        ratio = self.ratio_text()
        sign = "≤" if self.at_most else "≥"
        target = "" if self.target is None else (
            f"value {sign} {self.target:g}" if self.target_on_value else f"{sign} {self.target:g}")
        ok = "" if self.scored is None or self.target is None else (
            "yes" if self.met(self.scored) else "**no**")
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
    """The figures of one section of RESULTS.md (cpu, gpu, quality), as one run measured them."""

    section: str = "cpu"
    figures: list[Figure] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        ratio = f"  ratio {figure.ratio_text()}" if figure.ratio is not None else ""
        sign = "≤" if figure.at_most else "≥"
        target = f" (target {sign} {figure.target:g})" if figure.target is not None else ""
        base = f" vs {figure.baseline:.4g}" if figure.baseline is not None else ""
        print(f"{figure.name}: {figure.value:.4g} {figure.unit}{base}{ratio}{target}", flush=True)

    def text(self, command: str) -> str:
        import torch

        gpu = self.section == "gpu" and torch.cuda.is_available()
        device = torch.cuda.get_device_name(0) if gpu else "CPU"
        return "\n".join([
            f"## {TITLES.get(self.section, self.section.upper())}",
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


SECTIONS = ("cpu", "overhead", "gpu", "quality", "scale")
TITLES = {"overhead": "Queue overhead (CPU)", "quality": "Quality of generated digits (CPU)",
          "scale": "Scale: a million-line batch (CPU, `make bench-scale`)"}
NO_GPU = ("## GPU\n\nNo GPU was lent to the runs that wrote this file. `make bench` adds this "
          "section where CUDA is present (`python -m bench --only gpu` runs it alone).")


def write_results(reports: list[Report], command: str) -> None:
    """Rewrite the sections these reports measured; keep the other section as it was."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    blocks = {}
    for name in SECTIONS:
        found = re.search(f"<!-- {name} -->\n(.*?)\n<!-- /{name} -->", old, re.S)
        blocks[name] = found.group(1) if found else (NO_GPU if name == "gpu" else "")
    for report in reports:
        blocks[report.section] = report.text(command)
    RESULTS.write_text("\n".join([
        "# genq benchmarks",
        "",
        "Each ratio divides genq's figure by its baseline measured in the same run. "
        "`make bench` measures the CPU section, the queue's overhead on SQLite and "
        "PostgreSQL, the GPU section where CUDA is present, and the quality of generated "
        "images; `make bench-scale` measures a million-line batch on SQLite and PostgreSQL; "
        "`python -m bench --only cpu|overhead|gpu|quality|scale` measures one and keeps the "
        "others as they were.",
        "",
        *[f"<!-- {name} -->\n{blocks[name]}\n<!-- /{name} -->\n" for name in SECTIONS],
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
def bench_stack(gpus: int = 0, database_url: str | None = None,
                env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A fresh embedded stack (Redis, API, one CPU worker and `gpus` GPU workers) in a temp
    folder, on SQLite there or on the (empty) database at `database_url`; `env`: settings
    of its processes (GENQ_…) for this stack only."""
    from api.stack import Stack, free_port
    from common.celery_app import get_celery
    from common.config import Settings, get_settings
    from common.notices import redis_client

    with scratch_dir("genq-bench-") as home:
        os.environ.update({
            "GENQ_HOME": str(home), "GENQ_API_PORT": str(free_port()),
            "GENQ_REDIS_PORT": str(free_port()), "GENQ_RATE_LIMIT_PER_MINUTE": "0",
            "GENQ_LOG_LEVEL": "WARNING",
        })
        os.environ.pop("GENQ_DATABASE_URL", None)
        if database_url:
            os.environ["GENQ_DATABASE_URL"] = database_url
        os.environ.update(env or {})
        get_settings.cache_clear()
        get_celery.cache_clear()  # a second stack in this process has another broker
        stack = Stack(Settings(), gpus=gpus, with_flower=False)
        try:
            stack.start()
            # this process's broker clients follow the stack's Redis (an earlier stack's
            # port is gone)
            get_celery.cache_clear()
            redis_client.cache_clear()
            stack.wait_for_worker(gpu=gpus > 0)
            yield stack
        finally:
            stack.stop()
            for name in ["GENQ_DATABASE_URL", *(env or {})]:
                os.environ.pop(name, None)


@contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the PostgreSQL server of `server_url`; dropped after."""
    import uuid

    import psycopg

    from common.db import engine_for, normalize_url

    name = f"genq_bench_{uuid.uuid4().hex[:10]}"
    plain = server_url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server_url.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        engine_for(normalize_url(url)).dispose()
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
