"""A million-line batch against a ten-thousand-line one, same model and requests, on SQLite
and PostgreSQL: throughput, and the peak memory of the API and the worker (issue 23)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil

from bench.generation import through_sdk
from bench.harness import Figure, Report

N_SMALL, N_BIG, N_WARMUP = 10_000, 1_000_000, 200
MAX_TOKENS = 8  # short answers: what grows with the batch is the queue's share of the time
TINY_GPT = {"vocab_size": 512, "n_positions": 128, "n_embd": 32, "n_layer": 1, "n_head": 2}


@dataclass
class Run:
    lines: int
    seconds: float
    api_mib: float  # peak RSS of the API process
    worker_mib: float  # peak RSS of the worker: its main process and pool child together

    @property
    def rate(self) -> float:
        return self.lines / self.seconds


class PeakRss:
    """Samples the RSS of two process trees every 0.2 s on a thread; keeps each one's peak."""

    def __init__(self, api: psutil.Process, worker: psutil.Process):
        self.roots = {"api": api, "worker": worker}
        self.peak = dict.fromkeys(self.roots, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:  # once at once, then every 0.2 s, and once after the stop
            stopping = self._stop.is_set()
            for name, root in self.roots.items():
                try:
                    tree = [root, *root.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in tree)
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak[name], rss)
            if stopping:
                return
            self._stop.wait(0.2)

    @contextmanager
    def running(self) -> Iterator[PeakRss]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def measure(pids: tuple[int, int], sdk: Any, model: str, lines: int) -> Run:
    """One batch of `lines` through the SDK, with the peak RSS of the API and the worker
    (`pids`: their processes)."""
    with PeakRss(*(psutil.Process(pid) for pid in pids)).running() as rss:
        seconds, _ = through_sdk(sdk, model, lines, MAX_TOKENS)
    run = Run(lines, seconds, rss.peak["api"] / 2**20, rss.peak["worker"] / 2**20)
    print(f"  {lines:,} lines: {seconds:.1f} s, {run.rate:.0f} req/s, API peak "
          f"{run.api_mib:.0f} MiB, worker peak {run.worker_mib:.0f} MiB", flush=True)
    return run


def tiny_model(client: Any) -> str:
    job = client.create_job({"type": "train", "family": "gpt", "name": "scale-gpt",
                             "config": TINY_GPT, "steps": 20, "batch_size": 8, "seq_len": 32,
                             "queue": "cpu"})
    done = client.wait(job["id"], timeout=600)
    assert done["status"] == "succeeded", done
    return str(done["result"]["model"])


def bench_scale(report: Report, client: Any, sdk: Any, backend: str,
                pids: tuple[int, int]) -> None:
    """The figures on one database; `pids` are the API's and the CPU worker's processes."""
    model = tiny_model(client)
    through_sdk(sdk, model, N_WARMUP, MAX_TOKENS)  # the worker's model cache, first calls
    small = measure(pids, sdk, model, N_SMALL)
    big = measure(pids, sdk, model, N_BIG)
    what = f"{backend}: {N_BIG:,}-line batch vs {N_SMALL:,} lines"
    report.add(Figure(f"{what}, throughput", big.rate, "req/s", baseline=small.rate, target=0.9,
                      note=f"tiny gpt, {MAX_TOKENS} tokens, one CPU worker; upload → create → "
                           "held retrieve → streamed download, every custom_id checked once; "
                           f"{big.seconds:.0f} s against {small.seconds:.1f} s"))
    report.add(Figure(f"{what}, API peak RSS", big.api_mib, "MiB", baseline=small.api_mib,
                      target=1.5, at_most=True, note="sampled every 0.2 s through the run"))
    report.add(Figure(f"{what}, worker peak RSS", big.worker_mib, "MiB",
                      baseline=small.worker_mib, target=1.5, at_most=True,
                      note="main process and pool child together, sampled every 0.2 s"))

