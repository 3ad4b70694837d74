"""Queue overhead: submit→start latency and minimal-job throughput vs raw Celery tasks."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from bench.harness import Figure, Report, percentile

N_LATENCY, N_THROUGHPUT = 20, 60


def minimal_job(model: str) -> dict[str, Any]:
    return {"type": "generate", "model": model, "prompts": ["a"], "max_tokens": 1,
            "temperature": 0}


def start_latency(job: dict[str, Any]) -> float:
    created = datetime.fromisoformat(job["created_at"])
    return (datetime.fromisoformat(job["started_at"]) - created).total_seconds()


def raw_celery_rate(n: int) -> float:
    """genq.noop sent with send_task to the same Redis and worker; time until drained."""
    import redis

    from common.celery_app import get_celery, redis_lists
    from common.config import get_settings

    app = get_celery()
    r = redis.Redis.from_url(get_settings().broker_url)
    start = time.perf_counter()
    for _ in range(n):
        app.send_task("genq.noop", queue="cpu")
    lists = redis_lists("cpu")  # genq.noop goes at the default (lowest) priority
    while any(r.llen(name) for name in lists) or r.hlen("unacked"):
        time.sleep(0.005)
    return n / (time.perf_counter() - start)


def bench_overhead(report: Report, client: Any, model: str) -> None:
    latencies = []
    for _ in range(N_LATENCY):
        job = client.wait(client.create_job(minimal_job(model))["id"])
        latencies.append(start_latency(job))
    report.add(Figure("submit→start latency p50 (idle worker)", percentile(latencies, 0.5) * 1000,
                      "ms"))
    report.add(Figure("submit→start latency p95 (idle worker)", percentile(latencies, 0.95) * 1000,
                      "ms"))
    start = time.perf_counter()
    ids = [client.create_job(minimal_job(model))["id"] for _ in range(N_THROUGHPUT)]
    for job_id in ids:
        client.wait(job_id)
    genq_rate = N_THROUGHPUT / (time.perf_counter() - start)
    raw = raw_celery_rate(N_THROUGHPUT)
    report.add(Figure("minimal-job throughput through the API", genq_rate, "jobs/s", baseline=raw,
                      note="1-token generate job (claim, heartbeat, SQL items) vs raw Celery "
                           "send_task of a no-op on the same Redis/worker"))
