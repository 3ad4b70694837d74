"""Prometheus metrics computed from SQL and Redis at scrape time.

No in-process counters: the API may run as several processes, and the truth is in SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.celery_app import redis_lists
from common.config import get_settings
from common.db import session_factory
from common.errors import GpuUnreadable
from common.fleet import live_workers
from common.gpus import gpu_count, read_gpu
from common.models import FINISHED, Item, ItemStatus, Job, JobStatus, JobType
from common.notices import redis_client as broker_client

log = logging.getLogger(__name__)

DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class GenqCollector:
    """Reads jobs, items, workers and queues on every scrape."""

    def collect(self) -> Iterator[Metric]:
        with session_factory()() as session:
            yield from jobs_by_status(session)
            yield from items_and_tokens(session)
            yield from training_rates(session)
            yield from job_durations(session)
            yield from workers(session)
        yield from queue_depths()
        yield from gpus()


def jobs_by_status(session: Session) -> Iterator[Metric]:
    g = GaugeMetricFamily("genq_jobs", "Jobs by status and type.", labels=["status", "type"])
    counts = session.execute(
        select(Job.status, Job.type, func.count()).group_by(Job.status, Job.type)
    )
    seen = {(str(s), str(t)): int(n) for s, t, n in counts}
    for known_status in JobStatus:
        for known_type in JobType:
            key = (known_status.value, known_type.value)
            g.add_metric(list(key), seen.pop(key, 0))
    for (status, jtype), n in seen.items():
        g.add_metric([status, jtype], n)
    yield g
    q = GaugeMetricFamily("genq_jobs_queued", "Queued jobs per queue (SQL).", labels=["queue"])
    # One sample per queue: a declared queue with nothing queued reads 0, never 0 and then n.
    per_queue = dict.fromkeys(get_settings().queue_names, 0)
    rows = session.execute(select(Job.queue, func.count()).where(Job.status == JobStatus.queued)
                           .group_by(Job.queue))
    for queue, n in rows:
        per_queue[str(queue)] = int(n)
    for queue, n in per_queue.items():
        q.add_metric([queue], n)
    yield q


def items_and_tokens(session: Session) -> Iterator[Metric]:
    row = session.execute(
        select(func.count(), func.coalesce(func.sum(Item.tokens_in), 0),
               func.coalesce(func.sum(Item.tokens_out), 0))
               .where(Item.status == ItemStatus.succeeded)
    ).one()
    yield CounterMetricFamily("genq_items_generated", "Generated items (all jobs).",
                              value=int(row[0]))
    tokens = CounterMetricFamily("genq_tokens", "Tokens of generated items.", labels=["direction"])
    tokens.add_metric(["in"], int(row[1]))
    tokens.add_metric(["out"], int(row[2]))
    yield tokens


def training_rates(session: Session) -> Iterator[Metric]:
    """Latest logged speed of each running job: samples/s (training), items/s (generation)."""
    samples = GaugeMetricFamily("genq_training_samples_per_second",
                                "Latest samples/s of a running training job.",
                                labels=["job_id", "family", "worker"])
    items = GaugeMetricFamily("genq_generation_items_per_second",
                              "Latest items/s of a running generation job.",
                              labels=["job_id", "family", "worker"])
    running = session.scalars(select(Job).where(Job.status == JobStatus.running))
    for job in running:
        m: dict[str, Any] = job.metrics or {}
        labels = [job.id, job.family or "", job.worker or ""]
        if "samples_per_s" in m:
            samples.add_metric(labels, float(m["samples_per_s"]))
        if "items_per_s" in m:
            items.add_metric(labels, float(m["items_per_s"]))
    yield samples
    yield items


def job_durations(session: Session) -> Iterator[Metric]:
    """Run time (started → finished) of finished jobs, as a histogram per type."""
    h = HistogramMetricFamily("genq_job_duration_seconds", "Run time of finished jobs.",
                              labels=["type", "status"])
    rows = session.execute(
        select(Job.type, Job.status, Job.started_at, Job.finished_at)
        .where(Job.status.in_(FINISHED), Job.started_at.is_not(None), Job.finished_at.is_not(None))
    )
    series: dict[tuple[str, str], list[float]] = {}
    for jtype, status, started, finished in rows:
        if started is not None and finished is not None:
            series.setdefault((str(jtype), str(status)), []).append(
                max((finished - started).total_seconds(), 0.0))
    for (jtype, status), values in sorted(series.items()):
        buckets = [(str(b), float(sum(v <= b for v in values))) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        h.add_metric([jtype, status], buckets, sum_value=sum(values))
    yield h


def workers(session: Session) -> Iterator[Metric]:
    live = live_workers(session)
    g = GaugeMetricFamily("genq_workers", "Live workers (heartbeat within the lease) per queue.",
                          labels=["queue"])
    per_queue = {q: 0 for q in get_settings().queue_names}
    for w in live:
        for q in w.queues.split(","):
            per_queue[q] = per_queue.get(q, 0) + 1
    for q, n in per_queue.items():
        g.add_metric([q], n)
    yield g
    busy = GaugeMetricFamily("genq_workers_busy", "Live workers running a job.",
                             value=sum(1 for w in live if w.current_job))
    yield busy
    info = GaugeMetricFamily("genq_worker_info", "One per live worker.",
                             labels=["worker", "queues", "device", "version"])
    for w in live:
        info.add_metric([w.hostname, w.queues, str(w.device.get("type", "")), w.version], 1)
    yield info


def queue_depths() -> Iterator[Metric]:
    """Messages waiting in Redis per queue; absent (with genq_broker_up 0) when Redis is down."""
    depth = GaugeMetricFamily("genq_queue_depth", "Messages waiting in the broker per queue.",
                              labels=["queue"])
    up = 1
    try:
        redis = broker_client()
        for queue in get_settings().queue_names:
            with redis.pipeline(transaction=False) as pipe:
                for name in redis_lists(queue):
                    pipe.llen(name)
                depth.add_metric([queue], sum(int(n) for n in pipe.execute()))
    except Exception as exc:  # the scrape still answers with what SQL knows
        log.warning("queue depth unavailable: %s", exc)
        up = 0
    yield GaugeMetricFamily("genq_broker_up", "1 when Redis answered this scrape.", value=up)
    if up:
        yield depth


def gpus() -> Iterator[Metric]:
    """GPUs visible to this API host through NVML; nothing when pynvml is absent."""
    count = gpu_count()
    if count is None:
        return
    labels = ["gpu", "name"]
    used = GaugeMetricFamily("genq_gpu_memory_used_bytes", "GPU memory in use.", labels=labels)
    total = GaugeMetricFamily("genq_gpu_memory_total_bytes", "GPU memory.", labels=labels)
    util = GaugeMetricFamily("genq_gpu_utilization_ratio", "GPU busy fraction.", labels=labels)
    for i in range(count):
        try:
            gpu = read_gpu(i)
        except GpuUnreadable as exc:
            log.warning("gpu %s unreadable: %s", i, exc)
            continue
        if gpu.utilization is None:  # each GPU's three series come together or not at all
            log.warning("gpu %s unreadable: no utilization", i)
            continue
        used.add_metric([str(i), gpu.name], float(gpu.memory_used))
        total.add_metric([str(i), gpu.name], float(gpu.memory_total))
        util.add_metric([str(i), gpu.name], gpu.utilization)
    yield from (used, total, util)


_registry = CollectorRegistry(auto_describe=False)
_registry.register(GenqCollector())  # type: ignore[arg-type]


def render_metrics() -> bytes:
    """The text exposition format of every genq metric, read now."""
    return generate_latest(_registry)
