"""Prometheus metrics computed from SQL and Redis at scrape time.

No in-process counters: the API may run as several processes, and the truth is in SQL.
A scrape's cost does not grow with history: a job finished a while ago is folded once into
the `rollups` table (its count, run time and items), and each scrape reads those totals plus
the jobs not folded yet (queued, running, recently finished).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from common.celery_app import redis_lists
from common.config import get_settings
from common.db import session_factory
from common.errors import GpuUnreadable
from common.fleet import current_jobs, live_workers
from common.gpus import gpu_count, read_gpu
from common.models import (
    FINISHED,
    Item,
    ItemStatus,
    Job,
    JobStatus,
    JobType,
    Quota,
    Rollup,
    utcnow,
)
from common.notices import redis_client as broker_client

log = logging.getLogger(__name__)

DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


# A job finished this long ago is folded into the rollups: items a cancelled batch's last
# shard writes just after the batch ended are still counted live until then.
FOLD_AFTER = timedelta(seconds=60)
FOLD_AT_MOST = 5000  # jobs folded by one scrape; more wait for the next


class GenqCollector:
    """Reads jobs, items, workers and queues on every scrape."""

    def collect(self) -> Iterator[Metric]:
        with session_factory()() as session:
            yield from sql_metrics(session)
        yield from queue_depths()
        yield from gpus()


def sql_metrics(session: Session) -> Iterator[Metric]:
    """Every series SQL knows; the fold and the reads are one transaction under the fold lock."""
    fold_finished(session)
    totals = rollup_totals(session)
    yield from jobs_by_status(session, totals)
    yield from items_and_tokens(session, totals)
    yield from training_rates(session)
    yield from job_durations(session, totals)
    yield from scheduling(session, totals)
    yield from workers(session)
    session.commit()


class Finished(NamedTuple):
    type: str
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    attempts_log: list[Any] | None = None

    def preemptions(self) -> int:
        return sum(1 for a in self.attempts_log or []
                   if (a.get("error") or {}).get("code") == "preempted")

    def seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max((self.finished_at - self.started_at).total_seconds(), 0.0)


def fold_finished(session: Session) -> int:
    """Fold jobs finished over FOLD_AFTER ago into the rollups, each once; how many.

    The fold lock row is updated first and held until the caller commits, so concurrent
    scrapes (several API processes) fold and read one after another: no row a fold adds to
    is inserted twice, and no scrape sees a job in both the rollups and the live rows, or
    in neither."""
    session.execute(update(Rollup).where(Rollup.name == "lock").values(value=Rollup.value + 1))
    rows = session.execute(
        select(Job.id, Job.type, Job.status, Job.started_at, Job.finished_at, Job.attempts_log)
        .where(Job.rolled_up.is_(False), Job.status.in_(FINISHED),
               Job.finished_at < utcnow() - FOLD_AFTER)
        .limit(FOLD_AT_MOST)
    ).all()
    if not rows:
        return 0
    ids = [r.id for r in rows]
    add: dict[tuple[str, str], float] = {}
    for r in rows:
        for name, labels, value in job_rollup(Finished(str(r.type), str(r.status),
                                                       r.started_at, r.finished_at,
                                                       r.attempts_log)):
            add[(name, labels)] = add.get((name, labels), 0.0) + value
    made, tokens_in, tokens_out = session.execute(
        select(func.count(), func.coalesce(func.sum(Item.tokens_in), 0),
               func.coalesce(func.sum(Item.tokens_out), 0))
        .where(Item.job_id.in_(ids), Item.status == ItemStatus.succeeded)
    ).one()
    for name, labels, value in (("items", "", made), ("tokens", "in", tokens_in),
                                ("tokens", "out", tokens_out)):
        add[(name, labels)] = add.get((name, labels), 0.0) + float(value)
    session.execute(update(Job).where(Job.id.in_(ids)).values(rolled_up=True))
    present = set(session.execute(select(Rollup.name, Rollup.labels)
                                  .where(Rollup.name.in_({n for n, _ in add}))).tuples())
    for (name, labels), value in add.items():
        if (name, labels) in present:
            session.execute(update(Rollup).where(Rollup.name == name, Rollup.labels == labels)
                            .values(value=Rollup.value + value))
        else:
            session.add(Rollup(name=name, labels=labels, value=value))
    session.flush()
    return len(rows)


def job_rollup(job: Finished) -> Iterator[tuple[str, str, float]]:
    """The (name, labels, amount) a finished job adds to the rollups."""
    key = f"{job.type}|{job.status}"
    yield "jobs", key, 1.0
    if job.preemptions():
        yield "preemptions", "", float(job.preemptions())
    seconds = job.seconds()
    if seconds is None:
        return
    for bound in DURATION_BUCKETS:
        if seconds <= bound:
            yield "duration", f"{key}|{bound}", 1.0
    yield "duration", f"{key}|+Inf", 1.0
    yield "duration_sum", key, seconds


def rollup_totals(session: Session) -> dict[tuple[str, str], float]:
    rows = session.execute(select(Rollup.name, Rollup.labels, Rollup.value)
                           .where(Rollup.name != "lock"))
    return {(str(n), str(labels)): float(v) for n, labels, v in rows}


def jobs_by_status(session: Session, totals: dict[tuple[str, str], float]) -> Iterator[Metric]:
    g = GaugeMetricFamily("genq_jobs", "Jobs by status and type.", labels=["status", "type"])
    counts = session.execute(
        select(Job.status, Job.type, func.count()).where(Job.rolled_up.is_(False))
        .group_by(Job.status, Job.type)
    )
    seen = {(str(s), str(t)): int(n) for s, t, n in counts}
    for (name, labels), n in totals.items():
        if name == "jobs":
            jtype, status = labels.split("|")
            seen[(status, jtype)] = seen.get((status, jtype), 0) + int(n)
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


def items_and_tokens(session: Session, totals: dict[tuple[str, str], float]) -> Iterator[Metric]:
    """Succeeded items and their tokens: the rollups' plus those of jobs not folded yet."""
    row = session.execute(
        select(func.count(), func.coalesce(func.sum(Item.tokens_in), 0),
               func.coalesce(func.sum(Item.tokens_out), 0))
        .join(Job, Job.id == Item.job_id)
        .where(Job.rolled_up.is_(False), Item.status == ItemStatus.succeeded)
    ).one()
    yield CounterMetricFamily("genq_items_generated", "Generated items (all jobs).",
                              value=int(row[0]) + int(totals.get(("items", ""), 0)))
    tokens = CounterMetricFamily("genq_tokens", "Tokens of generated items.", labels=["direction"])
    tokens.add_metric(["in"], int(row[1]) + int(totals.get(("tokens", "in"), 0)))
    tokens.add_metric(["out"], int(row[2]) + int(totals.get(("tokens", "out"), 0)))
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


def job_durations(session: Session, totals: dict[tuple[str, str], float]) -> Iterator[Metric]:
    """Run time (started → finished) of finished jobs, as a histogram per type and status."""
    h = HistogramMetricFamily("genq_job_duration_seconds", "Run time of finished jobs.",
                              labels=["type", "status"])
    live = session.execute(
        select(Job.type, Job.status, Job.started_at, Job.finished_at)
        .where(Job.rolled_up.is_(False), Job.status.in_(FINISHED))
    )
    counts = {(name, labels): v for (name, labels), v in totals.items()
              if name in ("duration", "duration_sum")}
    for jtype, status, started, finished in live:
        for name, labels, value in job_rollup(Finished(str(jtype), str(status), started, finished)):
            if name.startswith("duration"):
                counts[(name, labels)] = counts.get((name, labels), 0.0) + value
    for key in sorted(labels for name, labels in counts if name == "duration_sum"):
        buckets = [(str(b), counts.get(("duration", f"{key}|{b}"), 0.0)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", counts.get(("duration", f"{key}|+Inf"), 0.0)))
        h.add_metric(key.split("|"), buckets, sum_value=counts[("duration_sum", key)])
    yield h


def scheduling(session: Session, totals: dict[tuple[str, str], float]) -> Iterator[Metric]:
    """Queued jobs by priority, how many owners wait, quota waits and preemptions."""
    by_priority = GaugeMetricFamily("genq_jobs_queued_by_priority",
                                    "Queued jobs (shards included) per queue and priority.",
                                    labels=["queue", "priority"])
    rows = session.execute(
        select(Job.queue, Job.priority, func.count())
        .where(Job.status == JobStatus.queued, Job.type != JobType.batch)
        .group_by(Job.queue, Job.priority))
    for queue, priority, n in rows:
        by_priority.add_metric([str(queue), str(priority)], int(n))
    yield by_priority
    owners = GaugeMetricFamily("genq_queued_owners", "Owners with a queued job, per queue.",
                               labels=["queue"])
    for queue, n in session.execute(
            select(Job.queue, func.count(func.distinct(Job.owner)))
            .where(Job.status == JobStatus.queued, Job.type != JobType.batch)
            .group_by(Job.queue)):
        owners.add_metric([str(queue)], int(n))
    yield owners
    held = GaugeMetricFamily("genq_jobs_waiting_for_quota",
                             "Jobs held in SQL by their owner's quota, per queue.",
                             labels=["queue"])
    for queue, n in session.execute(
            select(Job.queue, func.count())
            .where(Job.status == JobStatus.queued, Job.enqueued_at.is_(None),
                   Job.type.not_in([JobType.batch, JobType.shard]),
                   Job.owner.in_(select(Quota.owner)))
            .group_by(Job.queue)):
        held.add_metric([str(queue)], int(n))
    yield held
    live = sum(Finished("", "", None, None, log).preemptions() for (log,) in session.execute(
        select(Job.attempts_log).where(Job.rolled_up.is_(False))))
    yield CounterMetricFamily("genq_preemptions", "Attempts ended to free a worker for a "
                              "more urgent job.", value=live + totals.get(("preemptions", ""), 0))


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
                             value=len(current_jobs(session, [w.hostname for w in live])))
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
