"""/v1/batches: OpenAI's Batch API over sharded generation jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query

from api.broker import require_broker
from api.deps import OwnerDep, SessionDep
from api.json_body import GenqRoute
from api.waiting import WaitSeconds, read_when_finished
from common import jobs
from common.batches import create, views
from common.batches.schemas import BATCH_FINISHED, BatchCreate, BatchList, BatchOut
from common.dispatch import dispatch

router = APIRouter(prefix="/v1/batches", tags=["batches"], route_class=GenqRoute)


@router.post("", response_model=BatchOut)
def create_batch(
    spec: Annotated[BatchCreate, Body()],
    session: SessionDep,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> BatchOut:
    """Queue an uploaded JSONL file: `validating` until a worker has checked every line (a bad
    file: `failed` with each line's errors), then `in_progress` as its shards are written."""
    require_broker()
    parent, prepare = create.create_batch(session, owner=owner, spec=spec,
                                          idempotency_key=idempotency_key)
    if prepare is not None:  # not sent: the outbox sweep sends it
        dispatch(session, prepare)
    return views.batch_out(session, parent)


@router.get("", response_model=BatchList)
def list_batches(
    session: SessionDep,
    owner: OwnerDep,
    after: Annotated[str | None, Query(description="cursor: the last batch id seen")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    """Your batches, newest first."""
    rows, has_more = views.list_batches(session, owner=owner, after=after, limit=limit)
    data = [views.batch_out(session, r) for r in rows]
    return BatchList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                     last_id=data[-1].id if data else None)


@router.get("/{batch_id}", response_model=BatchOut)
async def get_batch(
    batch_id: str, session: SessionDep, owner: OwnerDep, wait: WaitSeconds = 0
) -> BatchOut:
    """One batch: status, request counts, output and error file ids."""

    def read() -> BatchOut:
        return views.batch_out(session, views.get_batch(session, owner=owner, batch_id=batch_id))

    return await read_when_finished(batch_id, read, lambda b: b.status in BATCH_FINISHED, wait,
                                    owner=owner, session=session)


@router.post("/{batch_id}/cancel", response_model=BatchOut)
def cancel_batch(batch_id: str, session: SessionDep, owner: OwnerDep) -> BatchOut:
    """Cancel: queued shards at once, running ones after their current generation batch."""
    views.get_batch(session, owner=owner, batch_id=batch_id)
    job = jobs.cancel_job(session, owner=owner, job_id=batch_id)
    views.mark_cancelling(session, job)
    return views.batch_out(session, job)
