"""The OpenAI batch object of a parent job, and the queries behind it (counts, get, list)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.batches.schemas import BatchErrors, BatchOut, BatchStatus, LineError, RequestCounts
from common.models import Item, ItemStatus, Job, JobStatus, JobType, utcnow
from common.owned import get_owned
from common.paging import keyset_page


def item_counts(session: Session, *, batch_id: str) -> tuple[int, int]:
    """(succeeded, failed) items across the batch's shards, as they stand now.

    A finished shard holds its counts (shard_finished) and a shard never started has none
    done, so items are counted row by row only in the shards under way: a poll costs about
    the same for 1,000 lines as for 100,000.
    """
    succeeded = failed = 0
    live = []
    shards = session.execute(
        select(Job.id, Job.started_at, Job.result)
        .where(Job.parent_id == batch_id, Job.type == JobType.shard)
    )
    for shard_id, started_at, result in shards:
        counts = (result or {}).get("item_counts")
        if counts is not None:
            succeeded, failed = succeeded + counts["succeeded"], failed + counts["failed"]
        elif started_at is not None:
            live.append(shard_id)
    live_succeeded, live_failed = count_items(session, live) if live else (0, 0)
    return succeeded + live_succeeded, failed + live_failed


def count_items(session: Session, job_ids: list[str]) -> tuple[int, int]:
    """(succeeded, failed) items of these jobs, counted row by row."""
    rows = session.execute(
        select(Item.status, func.count())
        .where(Item.job_id.in_(job_ids), Item.status != ItemStatus.pending)
        .group_by(Item.status)
    ).all()
    counts = {status: n for status, n in rows}
    return counts.get(ItemStatus.succeeded, 0), counts.get(ItemStatus.failed, 0)


def get_batch(session: Session, *, owner: str, batch_id: str) -> Job:
    return get_owned(session, Job, batch_id, owner=owner, where=[Job.type == JobType.batch],
                     what="batch", param="batch_id")


def mark_cancelling(session: Session, job: Job) -> None:
    """Remember when a cancel was asked (OpenAI's cancelling_at)."""
    if job.status == JobStatus.running and "cancelling_at" not in (job.result or {}):
        job.result = {**(job.result or {}), "cancelling_at": int(utcnow().timestamp())}
        session.commit()


def openai_status(job: Job) -> BatchStatus:
    """The OpenAI status of a parent job."""
    status = JobStatus(job.status)
    if status == JobStatus.succeeded:
        return BatchStatus.completed
    if status == JobStatus.failed:
        return BatchStatus.failed
    if status == JobStatus.cancelled:
        return BatchStatus.cancelled
    if status == JobStatus.queued:
        return BatchStatus.validating
    if job.cancel_requested:
        return BatchStatus.cancelling
    if job.shards_done >= job.shards_total:
        return BatchStatus.finalizing
    return BatchStatus.in_progress


def batch_out(session: Session, job: Job) -> BatchOut:
    """The OpenAI batch object of a parent job."""
    spec, result = job.spec or {}, job.result or {}

    def ts(value: Any) -> int | None:
        return int(value.timestamp()) if value is not None else None

    status = openai_status(job)
    if JobStatus(job.status).finished and "completed" in result:
        completed, failed = result["completed"], result["failed"]
    else:
        completed, failed = item_counts(session, batch_id=job.id)
    errors = None
    if result.get("errors"):
        errors = BatchErrors(data=[LineError(**e) for e in result["errors"]])
    finished = ts(job.finished_at)
    return BatchOut(
        id=job.id,
        endpoint=spec.get("endpoint", ""),
        model=spec.get("model"),
        errors=errors,
        input_file_id=spec.get("input_file_id", ""),
        completion_window=spec.get("completion_window", "24h"),
        status=status,
        output_file_id=result.get("output_file_id"),
        error_file_id=result.get("error_file_id"),
        created_at=int(job.created_at.timestamp()),
        in_progress_at=ts(job.started_at),
        expires_at=int((job.created_at + timedelta(hours=24)).timestamp()),
        finalizing_at=result.get("finalizing_at"),
        completed_at=finished if status == BatchStatus.completed else None,
        failed_at=finished if status == BatchStatus.failed else None,
        cancelling_at=result.get("cancelling_at"),
        cancelled_at=finished if status == BatchStatus.cancelled else None,
        request_counts=RequestCounts(total=job.progress_total or 0, completed=completed,
                                     failed=failed),
        metadata=spec.get("metadata"),
    )


def list_batches(
    session: Session, *, owner: str, after: str | None, limit: int
) -> tuple[list[Job], bool]:
    """Newest first; `after` is the last id of the previous page."""
    query = select(Job).where(Job.owner == owner, Job.type == JobType.batch)
    start = None
    if after:
        cursor = get_batch(session, owner=owner, batch_id=after)
        start = (cursor.created_at, cursor.id)
    page = keyset_page(session, query, (Job.created_at, Job.id), after=start, limit=limit,
                       newest_first=True)
    return page.rows, page.has_more

