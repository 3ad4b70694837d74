"""`make bench`: every benchmark in one run; figures as ratios; writes bench/RESULTS.md."""

from __future__ import annotations

import sys
import time

import openai

from bench.generation import bench_generation
from bench.harness import Report, bench_stack
from bench.overhead import bench_overhead
from bench.sql_writes import bench_sql_writes
from bench.training import bench_checkpoints, bench_training
from worker.malloc import tune_malloc


def main() -> int:
    start = time.perf_counter()
    # The in-process baselines get the worker's malloc thresholds (worker/malloc.py), as glibc
    # would set them itself once a large block is freed: the strongest baseline, and one that
    # does not depend on which benchmark ran first in this process.
    tune_malloc()
    report = Report()
    bench_sql_writes(report)
    bench_checkpoints(report)
    with bench_stack() as stack:
        from api.client import Client

        client = Client(api_key=stack.api_key)  # type: ignore[attr-defined]
        sdk = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=client.api_key,
                            max_retries=0)
        job = bench_training(report, client)
        model = job["result"]["model"]
        bench_generation(report, sdk, model)
        bench_overhead(report, client, model)
    report.write("make bench", time.perf_counter() - start)
    print(f"wrote bench/RESULTS.md in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
