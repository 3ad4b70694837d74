"""Queue overhead: submit→start latency and minimal-job throughput vs raw Celery tasks, on
SQLite and on PostgreSQL (each on a stack of its own with a small model trained there)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from bench.harness import Figure, Report, paired, percentile
from bench.training import TrainRun, train_spec
from common.gen_params import ItemInput

# the CPU section's gpt (2 layers, 64 wide), trained a few steps: a 1-token generate costs
# the same whatever the weights
MODEL = TrainRun(steps=20, batch=4, seq=16)
# The stack's worker runs torch on one thread, as the README advises beside other busy
# processes: a 1-token forward's ops are too small to share, and on two cores shared with
# the API, Redis, the client (and this machine's other work) every op waited for the second
# thread: a 1-token generate took 25-47 ms on two threads against 1.5-4 ms on one, measured
# in-process at a load of 4-6. Both baselines run on the same worker.
OVERHEAD_ENV = {"GENQ_TORCH_THREADS": "1"}
N_LATENCY = 20
N_THROUGHPUT = 200  # jobs through the API, and raw tasks, in one round
CLIENTS = 4  # threads creating jobs over HTTP, as a user submits many small jobs
ROUNDS, BUDGET_S = 6, 90


def minimal_job(model: str) -> dict[str, Any]:
    return {"type": "generate", "model": model, "prompts": ["a"], "max_tokens": 1,
            "temperature": 0}


def start_latency(job: dict[str, Any]) -> float:
    created = datetime.fromisoformat(job["created_at"])
    return (datetime.fromisoformat(job["started_at"]) - created).total_seconds()


def raw_celery_rate(n: int, task: str = "genq.noop", args: list[Any] | None = None) -> float:
    """n `task` messages sent with send_task to the same Redis and worker; time until
    drained."""
    import redis

    from common.celery_app import get_celery, redis_lists
    from common.config import get_settings

    app = get_celery()
    r = redis.Redis.from_url(get_settings().broker_url)
    start = time.perf_counter()
    for _ in range(n):
        app.send_task(task, args=args, queue="cpu")
    lists = redis_lists("cpu")  # genq.noop goes at the default (lowest) priority
    while any(r.llen(name) for name in lists) or r.hlen("unacked"):
        time.sleep(0.005)
    return n / (time.perf_counter() - start)


def cpu_seconds(stack: Any) -> dict[str, float]:
    """CPU time (user + system) so far of each process of the stack, the worker's pool
    children counted under "pool child", and of this process (the client)."""
    import psutil

    def used(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    totals: dict[str, float] = {"client": used(psutil.Process())}
    for name, popen in stack.procs:
        main = psutil.Process(popen.pid)
        label = "worker main" if name.startswith("worker") else name
        totals[label] = totals.get(label, 0.0) + used(main)
        if name.startswith("worker"):
            totals["pool child"] = totals.get("pool child", 0.0) + sum(
                used(child) for child in main.children(recursive=True))
    return totals


def cpu_per_job(stack: Any, run: Callable[[int], float], n: int) -> dict[str, float]:
    """Milliseconds of CPU per job in each process while `run(n)` puts n jobs through."""
    before = cpu_seconds(stack)
    run(n)
    after = cpu_seconds(stack)
    return {name: 1000 * (after[name] - before.get(name, 0.0)) / n for name in after}


def split_text(per_job: dict[str, float]) -> str:
    return ", ".join(f"{name} {ms:.2f}" for name, ms in per_job.items() if ms >= 0.005)


def genq_rate(clients: list[Any], model: str, n: int) -> float:
    """n minimal jobs created over HTTP by len(clients) threads; time until all finished."""
    def submit(client: Any, count: int) -> list[str]:
        return [client.create_job(minimal_job(model))["id"] for _ in range(count)]

    start = time.perf_counter()
    with ThreadPoolExecutor(len(clients)) as pool:
        parts = list(pool.map(submit, clients, [n // len(clients)] * len(clients)))
    ids = [job_id for part in parts for job_id in part]
    all_finished(clients[0], ids, last=[part[-1] for part in parts])
    return len(ids) / (time.perf_counter() - start)


def all_finished(client: Any, ids: list[str], *, last: list[str]) -> None:
    """Return once every job of `ids` has succeeded: held reads of the `last` ones (the
    worker runs jobs in the order they came), then the list of jobs, 100 a page, with a
    held read for any not finished yet. The raw side watches the broker's queue: neither
    pays a request per job to learn that the jobs are done."""
    for job_id in last:
        client.wait(job_id)
    statuses: dict[str, str] = {}
    after = None
    while len(statuses) < len(ids):
        page = client.list_jobs(limit=100, after=after)
        statuses.update({j["id"]: j["status"] for j in page["data"]})
        if not page["has_more"]:
            break
        after = page["next_cursor"]
    for job_id in ids:
        status = statuses.get(job_id)
        if status != "succeeded":
            status = client.wait(job_id)["status"]
        assert status == "succeeded", f"minimal job {job_id} ended {status}"


def bench_overhead(report: Report, stack: Any, *, database: str) -> None:
    """The latency and throughput figures on one stack (whose database is `database`)."""
    from api.client import Client

    clients = [Client(api_key=stack.api_key) for _ in range(CLIENTS)]
    client = clients[0]
    trained = client.wait(client.create_job(train_spec("overhead", MODEL))["id"])
    assert trained["status"] == "succeeded", trained
    model = trained["result"]["model"]
    latencies = []
    for _ in range(N_LATENCY):
        job = client.wait(client.create_job(minimal_job(model))["id"])
        latencies.append(start_latency(job))
    report.add(Figure(f"submit→start latency p50 (idle worker, {database})",
                      percentile(latencies, 0.5) * 1000, "ms"))
    report.add(Figure(f"submit→start latency p95 (idle worker, {database})",
                      percentile(latencies, 0.95) * 1000, "ms"))
    jobs = (f"{N_THROUGHPUT} 1-token generate jobs created over HTTP by {CLIENTS} client "
            "threads, from the first create until all are seen finished (held reads of the "
            "last ones, then the job list); the worker runs torch on one thread "
            "(GENQ_TORCH_THREADS=1)")
    genq, raw, rounds = paired(ROUNDS, lambda: genq_rate(clients, model, N_THROUGHPUT),
                               lambda: raw_celery_rate(N_THROUGHPUT), budget_s=BUDGET_S)
    report.add(Figure(
        f"minimal-job throughput through the API ({database})", genq, "jobs/s", baseline=raw,
        target=0.5, rounds=rounds,
        note=f"{jobs}, vs as many raw Celery send_task of a no-op drained by the same worker "
             "through the same Redis"))
    # where the CPU goes: on two cores, the sum over processes bounds the throughput
    ours = cpu_per_job(stack, lambda n: genq_rate(clients, model, n), N_THROUGHPUT)
    theirs = cpu_per_job(stack, raw_celery_rate, N_THROUGHPUT)
    cores = os.cpu_count() or 1
    server = "" if database == "SQLite" else f"; {database}'s server processes not counted"
    report.add(Figure(
        f"CPU per minimal job, all processes ({database})", sum(ours.values()), "ms",
        baseline=sum(theirs.values()),
        note=f"per job in ms: {split_text(ours)}; raw Celery no-op: {split_text(theirs)}"
             f" (user + system time of each process over one round{server}); {cores} cores "
             f"busy with nothing else would run at most "
             f"{1000 * cores / sum(ours.values()):.0f} such jobs/s"))
    # the same work without the queue: what the job's own model call costs
    model_id = client.request("GET", f"/v1/models/{model}")["genq_id"]
    gen = ItemInput(prompt="a", max_tokens=1, temperature=0).model_dump()
    genq, raw, rounds = paired(
        ROUNDS, lambda: genq_rate(clients, model, N_THROUGHPUT),
        lambda: raw_celery_rate(N_THROUGHPUT, "genq.raw_generate", [model_id, gen]),
        budget_s=BUDGET_S)
    report.add(Figure(
        f"minimal-job throughput through the API vs raw Celery doing its work ({database})",
        genq, "jobs/s", baseline=raw, rounds=rounds,
        note=f"{jobs}, vs as many raw Celery tasks each running the same request through the "
             "worker's model cache and common.ml.generate (no SQL, no HTTP)"))
