"""`make bench`: every benchmark in one run; figures as ratios; writes bench/RESULTS.md."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from typing import Any

import openai

from bench.generation import bench_generation
from bench.harness import Report, bench_stack, postgres_database, write_results
from bench.overhead import OVERHEAD_ENV, bench_overhead
from bench.sql_writes import bench_sql_writes, postgres_url
from bench.training import bench_checkpoints, bench_lora_training, bench_training
from worker.malloc import tune_malloc


def clients(stack: Any) -> tuple[Any, openai.OpenAI]:
    """genq's SDK client and the official openai one, both on the stack's API."""
    from api.client import Client

    client = Client(api_key=stack.api_key)
    sdk = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=client.api_key, max_retries=0)
    return client, sdk


def cpu_section() -> Report:
    report = Report("cpu")
    bench_sql_writes(report)
    bench_checkpoints(report)
    with bench_stack() as stack:
        client, sdk = clients(stack)
        job = bench_training(report, client)
        bench_lora_training(report, client)
        model = job["result"]["model"]
        bench_generation(report, sdk, model)
    return report


def overhead_section() -> Report:
    """Queue overhead on SQLite, and on PostgreSQL (a database of its own) where one answers."""
    report = Report("overhead")
    for name, server in databases():
        with (postgres_database(server) if server else nullcontext(None)) as url, \
                bench_stack(database_url=url, env=OVERHEAD_ENV) as stack:
            bench_overhead(report, stack, database=name)
    return report


def gpu_section() -> Report:
    import torch

    from bench.gpu import bench_gpu

    report = Report("gpu")
    with bench_stack(gpus=torch.cuda.device_count()) as stack:
        client, sdk = clients(stack)
        bench_gpu(report, client, sdk)
    return report


def quality_section() -> Report:
    from bench.image_quality import bench_image_quality

    report = Report("quality")
    with bench_stack() as stack:
        client, _ = clients(stack)
        bench_image_quality(report, client)
    return report


def scale_section() -> Report:
    """A million-line batch on SQLite, and on PostgreSQL (a database of its own) where one
    answers."""
    from bench.scale import bench_scale

    report = Report("scale")
    for name, server in databases():
        with (postgres_database(server) if server else nullcontext(None)) as url, \
                bench_stack(database_url=url) as stack:
            client, sdk = clients(stack)
            procs = dict(stack.procs)
            bench_scale(report, client, sdk, name,
                        pids=(procs["api"].pid, procs["worker-cpu"].pid))
    return report


def databases() -> list[tuple[str, str | None]]:
    """SQLite (no server), and the PostgreSQL server where one answers."""
    return [("SQLite", None)] + ([("PostgreSQL", pg)] if (pg := postgres_url()) else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", choices=["cpu", "overhead", "gpu", "quality", "scale"],
                        help="measure one section; RESULTS.md keeps the others as they were")
    args = parser.parse_args(argv)
    import torch

    # The in-process baselines get the worker's malloc thresholds (worker/malloc.py), as glibc
    # would set them itself once a large block is freed: the strongest baseline, and one that
    # does not depend on which benchmark ran first in this process.
    tune_malloc()
    start = time.perf_counter()
    reports = []
    sections = (("cpu", cpu_section), ("overhead", overhead_section), ("gpu", gpu_section),
                ("quality", quality_section), ("scale", scale_section))
    for name, run in sections:
        if args.only != name and (args.only is not None or name == "scale"):
            continue  # the scale section runs alone: `make bench-scale`
        if name == "gpu" and not torch.cuda.is_available():
            print("no CUDA device: the GPU section is skipped", flush=True)
            continue
        began = time.perf_counter()
        reports.append(run())
        reports[-1].seconds = time.perf_counter() - began
    command = "make bench" if args.only is None else f"python -m bench --only {args.only}"
    write_results(reports, command)
    print(f"wrote bench/RESULTS.md in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (api/stack.py): the stack is stopped
        print("interrupted: nothing written; the benchmark's stack is stopped", flush=True)
        sys.exit(130)
