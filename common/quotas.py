"""Quotas per owner: at most N jobs in flight per queue, and GPU-seconds per rolling day.

A job over its owner's quota is accepted and waits in SQL (`queued`, no broker message);
it is sent once the owner is under quota again: when one of the owner's jobs finishes
(`release_held`, in the process that finished it) and in the reaper leader's outbox sweep,
which covers a process that died in between. Batch shards are held the same way by the
fair-share release (common/dispatch.py).

"In flight" is a job on the broker or running: a message sent is a job that will run, so
the limit counts it from the moment it is sent. GPU-seconds are the run time of the owner's
jobs on GPU queues (`gpu`, `gpu-…`) within the last 24 hours, running ones up to now. An
owner with no quota row has no limits, and costs one primary-key lookup per check.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from common.models import Job, JobStatus, JobType, Quota, utcnow

DAY = timedelta(days=1)


def is_gpu_queue(queue: str) -> bool:
    return queue == "gpu" or queue.startswith("gpu-")


def get_quota(session: Session, owner: str, *, lock: bool = False) -> Quota | None:
    """The owner's quota row; `lock` holds it (PostgreSQL) until the caller commits, so two
    processes sending the same owner's jobs count one after the other."""
    return session.get(Quota, owner, with_for_update=lock)


def set_quota(session: Session, owner: str, *, max_running: dict[str, int] | None = None,
              gpu_seconds_per_day: float | None = None, clear: bool = False) -> Quota | None:
    """Merge limits into owner's quota (`clear` first drops every limit); the row, or None
    once it holds no limit."""
    row = session.get(Quota, owner)
    if row is None:
        row = Quota(owner=owner, max_running={})
        session.add(row)
    if clear:
        row.max_running, row.gpu_seconds_per_day = {}, None
    if max_running:
        row.max_running = {**(row.max_running or {}), **max_running}
    if gpu_seconds_per_day is not None:
        row.gpu_seconds_per_day = gpu_seconds_per_day
    row.updated_at = utcnow()
    if not row.max_running and row.gpu_seconds_per_day is None:
        session.delete(row)
        session.commit()
        return None
    session.commit()
    return row


def in_flight(session: Session, owner: str, queue: str) -> int:
    """The owner's jobs on the broker or running on `queue` (batch parents never run)."""
    return int(session.scalar(
        select(func.count()).select_from(Job).where(
            Job.owner == owner, Job.queue == queue, Job.type != JobType.batch,
            or_(Job.status == JobStatus.running,
                (Job.status == JobStatus.queued) & Job.enqueued_at.is_not(None)))) or 0)


def gpu_seconds(session: Session, owner: str, now: datetime | None = None) -> float:
    """Run time of the owner's jobs on GPU queues within the 24 hours before `now`."""
    now = now or utcnow()
    since = now - DAY
    rows = session.execute(
        select(Job.queue, Job.started_at, Job.finished_at).where(
            Job.owner == owner, Job.started_at.is_not(None), Job.type != JobType.batch,
            or_(Job.finished_at.is_(None), Job.finished_at > since))
    ).all()
    total = 0.0
    for queue, started, finished in rows:
        if started is None or not is_gpu_queue(queue):
            continue
        end = finished or now
        total += max((end - max(started, since)).total_seconds(), 0.0)
    return total


class QuotaCheck:
    """Quota answers for one pass over many jobs: each owner's row and counts read once,
    and `sent` keeps the counts true as the pass sends jobs."""

    def __init__(self, session: Session, *, lock: bool = True):
        self.session, self.lock = session, lock
        self._quotas: dict[str, Quota | None] = {}
        self._flight: dict[tuple[str, str], int] = {}
        self._gpu: dict[str, float] = {}

    def blocked(self, owner: str, queue: str) -> dict[str, Any] | None:
        """The `waiting` of a job of owner's on queue held by its quota; None if it may go."""
        if owner not in self._quotas:
            self._quotas[owner] = get_quota(self.session, owner, lock=self.lock)
        quota = self._quotas[owner]
        if quota is None:
            return None
        limit = (quota.max_running or {}).get(queue)
        if limit is not None:
            if (owner, queue) not in self._flight:
                self._flight[(owner, queue)] = in_flight(self.session, owner, queue)
            running = self._flight[(owner, queue)]
            if running >= limit:
                return {"reason": "quota", "limit": "max_running", "queue": queue,
                        "in_flight": running, "max": limit}
        if quota.gpu_seconds_per_day is not None and is_gpu_queue(queue):
            if owner not in self._gpu:
                self._gpu[owner] = gpu_seconds(self.session, owner)
            used = self._gpu[owner]
            if used >= quota.gpu_seconds_per_day:
                return {"reason": "quota", "limit": "gpu_seconds_per_day", "queue": queue,
                        "used": round(used, 1), "max": quota.gpu_seconds_per_day}
        return None

    def sent(self, owner: str, queue: str) -> None:
        if (owner, queue) in self._flight:
            self._flight[(owner, queue)] += 1


def held_by_quota(session: Session, job: Job, *, lock: bool = True) -> dict[str, Any] | None:
    """Whether this job's owner is over quota on its queue (its `waiting`), else None."""
    return QuotaCheck(session, lock=lock).blocked(job.owner, job.queue)
