"""/v1/jobs: create, list, read, cancel, items."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Response
from sqlalchemy import select

from api.broker import require_broker
from api.deps import OwnerDep, SessionDep
from api.json_body import GenqRoute
from api.views import job_out
from api.waiting import WaitSeconds, read_when_finished
from common import jobs
from common.batches.views import item_counts
from common.config import get_settings
from common.dispatch import dispatch_within_quota, why_waiting
from common.models import FINISHED, Item, Job, JobStatus, JobType
from common.paging import keyset_page
from common.schemas import ItemList, ItemOut, JobList, JobOut, JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=GenqRoute)


@router.post("", status_code=201, response_model=JobOut, responses={
    200: {"model": JobOut, "description": "An Idempotency-Key used before: the job it made"}})
def create_job(
    spec: Annotated[JobSpec, Body()],
    session: SessionDep,
    owner: OwnerDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> JobOut:
    """Submit a training or generation job."""
    require_broker()
    job, created = jobs.create_job(session, owner=owner, spec=spec, idempotency_key=idempotency_key)
    if created:
        dispatch_within_quota(session, job)
    else:
        response.status_code = 200
    return job_out(job)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status: Annotated[JobStatus | None, Query()] = None,
    type: Annotated[JobType | None, Query()] = None,
    after: Annotated[str | None, Query(description="cursor: a job id from the last page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """List your jobs, newest first."""
    # a batch's shards and preparing job are parts of it: GET /v1/jobs/{id} shows them
    query = select(Job).where(Job.owner == owner, Job.type.not_in([JobType.shard, JobType.prepare]))
    if status:
        query = query.where(Job.status == status)
    if type:
        query = query.where(Job.type == type)
    start = None
    if after:
        cursor = jobs.get_job(session, owner=owner, job_id=after)
        start = (cursor.created_at, cursor.id)
    page = keyset_page(session, query, (Job.created_at, Job.id), after=start, limit=limit,
                       newest_first=True)
    return JobList(data=[job_out(j, waiting=why_waiting(session, j)) for j in page.rows],
                   has_more=page.has_more, next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(
    job_id: str, session: SessionDep, owner: OwnerDep, wait: WaitSeconds = 0
) -> JobOut:
    """One job: status, progress, metrics, attempts, result."""

    def read() -> JobOut:
        job = jobs.get_job(session, owner=owner, job_id=job_id)
        out = job_out(job, waiting=why_waiting(session, job))
        if job.type == JobType.batch and job.status == JobStatus.running:
            out.progress.done = sum(item_counts(session, batch_id=job.id))
        return out

    return await read_when_finished(job_id, read, lambda j: j.status in FINISHED, wait,
                                    owner=owner, session=session)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    force: Annotated[
        bool, Query(description="also terminate it if still running after GENQ_CANCEL_GRACE_S")
    ] = False,
) -> JobOut:
    """Cancel: queued jobs at once, running ones at their next step or batch."""
    job = jobs.cancel_job(session, owner=owner, job_id=job_id)
    if force and job.status == JobStatus.running and job.type != JobType.batch:
        jobs.schedule_force_cancel(session, job, grace_s=get_settings().cancel_grace_s)
    return job_out(job)


@router.get("/{job_id}/items", response_model=ItemList)
def list_items(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    after: Annotated[int | None, Query(description="cursor: the last index seen")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ItemList:
    """The generated items of a job, by index."""
    job = jobs.get_job(session, owner=owner, job_id=job_id)
    page = keyset_page(session, select(Item).where(Item.job_id == job.id), (Item.index,),
                       after=None if after is None else (after,), limit=limit)
    return ItemList(data=[ItemOut.model_validate(r) for r in page.rows], has_more=page.has_more,
                    next_cursor=page.next_cursor)
