"""Sending jobs to the broker: one attempt at a time, and batch shards in fair shares.

Jobs are sent when they are created. Batch shards are not: a batch of a thousand shards on
the broker at once would hold every worker until it is done, and a colleague's later small
batch would wait behind all of it. Shards wait in SQL (`queued`, no message) and
`release_shards` sends, per queue, only as many as keep each live worker busy with one
more waiting (so a batch alone still runs at full speed), choosing by priority, then the
owner with the fewest shards sent or running, then the oldest batch. An owner at its
quota (common/quotas.py) sends no shard until under it again.

It runs after a batch is created (in the API), after a shard finishes (in the process
that finished it, before its worker takes the next message), and in the reaper leader's
round, which covers a process that died between the two. Two releasers at one moment may
both send: the worst case is a shard sent twice, whose second claim is dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from common.celery_app import send_job
from common.fleet import live_workers
from common.models import Job, JobStatus, JobType, Quota, utcnow
from common.quotas import QuotaCheck, held_by_quota

log = logging.getLogger(__name__)

SENT_PER_WORKER = 2  # shards on the broker or running per live worker of a queue: one
# running and one waiting, so a worker finishing a shard finds the next without a pause


def dispatch(session: Session, job: Job) -> bool:
    """Send the job's current attempt to Celery; False (job stays in the outbox) if it fails."""
    # the priority rides along for Flower, whose task views show kwargs (the worker ignores it)
    kwargs = {"family": job.family, "model": job.model_id, "priority": job.priority}
    try:
        task_id = send_job(job.id, job.attempt, job_type=job.type, queue=job.queue, kwargs=kwargs,
                           priority=job.priority)
    except Exception as exc:  # broker down: the outbox sweep re-sends later
        log.warning("job %s: broker unreachable, left in outbox: %s", job.id, exc)
        return False
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.attempt == job.attempt)
        .values(enqueued_at=utcnow(), celery_task_id=task_id)
    )
    session.commit()
    return True


def dispatch_within_quota(session: Session, job: Job) -> bool:
    """Send a new job unless its owner is over quota (then it waits in SQL for
    release_held); True if it was sent."""
    if held_by_quota(session, job) is not None:
        session.commit()  # ends the quota row's lock
        return False
    return dispatch(session, job)


def release_held(session: Session, owner: str | None = None, *, min_age_s: float = 2.0,
                 per_owner: int = 100) -> int:
    """Send the jobs held by a quota that now fit (one owner's, or every owner with a quota);
    how many were sent. Jobs younger than min_age_s are left to the API creating them."""
    now = utcnow()
    owners = [owner] if owner else list(session.scalars(select(Quota.owner)))
    sent = 0
    for name in owners:
        held = session.scalars(
            select(Job).where(
                Job.owner == name, Job.status == JobStatus.queued, Job.enqueued_at.is_(None),
                Job.type.not_in([JobType.batch, JobType.shard]),
                Job.cancel_requested.is_(False),
                or_(Job.not_before.is_(None), Job.not_before <= now),
                Job.created_at <= now - timedelta(seconds=min_age_s))
            .order_by(Job.priority.desc(), Job.created_at).limit(per_owner)
        ).all()
        check = QuotaCheck(session)
        for job in held:
            if check.blocked(job.owner, job.queue) is None and dispatch(session, job):
                check.sent(job.owner, job.queue)
                sent += 1
        session.commit()
    return sent


def held_shards(now: datetime) -> ColumnElement[bool]:
    """The condition of a shard waiting in SQL to be released (its back-off over)."""
    return (
        (Job.type == JobType.shard)
        & (Job.status == JobStatus.queued)
        & Job.enqueued_at.is_(None)
        & Job.cancel_requested.is_(False)
        & or_(Job.not_before.is_(None), Job.not_before <= now)
    )


def why_waiting(session: Session, job: Job) -> dict[str, Any] | None:
    """Why a queued job has not started (common/schemas.py Waiting); None if not queued."""
    if job.status != JobStatus.queued:
        return None
    now = utcnow()
    if job.not_before is not None and job.not_before > now:
        return {"reason": "backoff", "until": job.not_before}
    if job.enqueued_at is None and job.type != JobType.batch:
        quota = held_by_quota(session, job, lock=False)
        if quota is not None:
            return quota
    if job.type == JobType.shard and job.enqueued_at is None:
        return {"reason": "fair_share"}
    if not any(job.queue in w.queues.split(",") for w in live_workers(session)):
        return {"reason": "no_worker"}
    sent_before = Job.enqueued_at < job.enqueued_at if job.enqueued_at else Job.id != job.id
    ahead = session.scalar(
        select(func.count()).select_from(Job).where(
            Job.queue == job.queue, Job.status == JobStatus.queued, Job.id != job.id,
            Job.enqueued_at.is_not(None),
            or_(Job.priority > job.priority, (Job.priority == job.priority) & sent_before)))
    return {"reason": "priority", "position": int(ahead or 0) + 1}


def release_shards(session: Session, queue: str | None = None) -> int:
    """Send the held shards that fit on each queue (all queues with held shards, or one);
    returns how many were sent."""
    now = utcnow()
    queues = [queue] if queue else list(session.scalars(
        select(Job.queue).where(held_shards(now)).distinct()))
    workers = Counter(q for w in live_workers(session) for q in w.queues.split(","))
    sent = 0
    for name in queues:
        sent += _release_on(session, name, slots=SENT_PER_WORKER * max(1, workers[name]), now=now)
    return sent


def _release_on(session: Session, queue: str, *, slots: int, now: datetime) -> int:
    out = session.execute(
        select(Job.owner, func.count()).where(
            Job.queue == queue, Job.type == JobType.shard,
            or_(Job.status == JobStatus.running,
                (Job.status == JobStatus.queued) & Job.enqueued_at.is_not(None)))
        .group_by(Job.owner)
    ).all()
    sent_by_owner: Counter[str] = Counter({owner: n for owner, n in out})
    free = slots - sum(sent_by_owner.values())
    if free <= 0:
        return 0
    # each owner's next `free` shards, in the order that owner's own shards go
    rank = func.row_number().over(partition_by=Job.owner,
                                  order_by=(Job.priority.desc(), Job.created_at, Job.id))
    ranked = (select(Job.id, Job.owner, Job.priority, Job.created_at, rank.label("rank"))
              .where(Job.queue == queue, held_shards(now)).subquery())
    candidates = session.execute(
        select(ranked.c.id, ranked.c.owner, ranked.c.priority, ranked.c.created_at)
        .where(ranked.c.rank <= free)
        .order_by(ranked.c.owner, ranked.c.rank)
    ).all()
    by_owner: dict[str, list[Any]] = {}
    for row in candidates:
        by_owner.setdefault(row.owner, []).append(row)
    picked: list[str] = []
    quotas = QuotaCheck(session, lock=False)  # an owner at quota sends none this round
    while len(picked) < free and any(by_owner.values()):
        owner = min((o for o, rows in by_owner.items() if rows), key=lambda o: (
            -by_owner[o][0].priority, sent_by_owner[o], by_owner[o][0].created_at, o))
        if quotas.blocked(owner, queue) is not None:
            by_owner[owner] = []
            continue
        picked.append(by_owner[owner].pop(0).id)
        sent_by_owner[owner] += 1
        quotas.sent(owner, queue)
    session.commit()  # no transaction held while sending
    released = 0
    for job_id in picked:
        job = session.get(Job, job_id)
        if job is not None and job.status == JobStatus.queued and job.enqueued_at is None:
            released += dispatch(session, job)
    return released
