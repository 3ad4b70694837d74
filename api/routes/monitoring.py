"""Watching jobs: /v1/jobs/{id}/metrics, /events (server-sent events), /logs; /metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from sqlalchemy import select
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from api.deps import OwnerDep, SessionDep, get_owner
from api.json_body import GenqRoute
from api.prometheus import render_metrics
from api.views import progress_of
from api.waiting import held, until_event, waiters
from common import jobs
from common.config import get_settings
from common.db import session_factory
from common.dispatch import why_waiting
from common.models import FINISHED, JobLog, Metric
from common.paging import keyset_page
from common.schemas import Waiting

router = APIRouter(tags=["monitoring"], route_class=GenqRoute)

POLL_S = 0.5
KEEPALIVE_S = 15.0


class MetricPoint(BaseModel):
    step: int
    name: str
    value: float
    at: datetime


class MetricList(BaseModel):
    object: str = "list"
    job_id: str
    names: list[str]
    data: list[MetricPoint]


class LogLine(BaseModel):
    id: int
    at: datetime
    level: str
    message: str


class LogList(BaseModel):
    object: str = "list"
    job_id: str
    data: list[LogLine]
    has_more: bool
    next_cursor: int | None = None


@router.get("/v1/jobs/{job_id}/metrics", response_model=MetricList)
def job_metrics(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    name: Annotated[list[str] | None, Query(description="only these series, e.g. loss")] = None,
) -> MetricList:
    """A job's metric series by step (the loss curve and friends)."""
    job = jobs.get_job(session, owner=owner, job_id=job_id)
    query = select(Metric).where(Metric.job_id == job.id)
    if name:
        query = query.where(Metric.name.in_(name))
    rows = list(session.scalars(query.order_by(Metric.step, Metric.name)))
    return MetricList(
        job_id=job.id,
        names=sorted({r.name for r in rows}),
        data=[MetricPoint(step=r.step, name=r.name, value=r.value, at=r.at) for r in rows],
    )


@router.get("/v1/jobs/{job_id}/logs", response_model=LogList)
def job_logs(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    after: Annotated[int | None, Query(description="cursor: the last line id seen")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> LogList:
    """A job's log lines, oldest first."""
    job = jobs.get_job(session, owner=owner, job_id=job_id)
    page = keyset_page(session, select(JobLog).where(JobLog.job_id == job.id), (JobLog.id,),
                       after=None if after is None else (after,), limit=limit)
    return LogList(
        job_id=job.id,
        data=[LogLine(id=r.id, at=r.at, level=r.level, message=r.message) for r in page.rows],
        has_more=page.has_more,
        next_cursor=page.next_cursor,
    )


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse)
def job_events(
    job_id: str, session: SessionDep, owner: OwnerDep, request: Request
) -> StreamingResponse:
    """Server-sent events: `status` and `progress` until the job finishes."""
    jobs.get_job(session, owner=owner, job_id=job_id)
    session.close()  # the stream polls with short sessions of its own
    release = held.take(owner)  # a 429 past the owner's cap of held requests and streams
    return StreamingResponse(
        _stream(request, owner, job_id, release),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(release),  # should the stream never start
    )


def _snapshot(owner: str, job_id: str) -> dict[str, Any]:
    with session_factory()() as session:
        job = jobs.get_job(session, owner=owner, job_id=job_id)
        waiting = why_waiting(session, job)
        return {
            "id": job.id, "status": job.status, "attempt": job.attempt,
            "waiting": None if waiting is None else Waiting.model_validate(waiting).model_dump(),
            "progress": progress_of(job).model_dump(), "metrics": job.metrics or {},
            "error": job.error, "worker": job.worker,
        }


async def _stream(request: Request, owner: str, job_id: str,
                  release: Callable[[], None]) -> AsyncIterator[str]:
    try:
        async for event in _events(request, owner, job_id):
            yield event
    finally:
        release()


async def _events(request: Request, owner: str, job_id: str) -> AsyncIterator[str]:
    last: dict[str, Any] | None = None
    quiet = 0.0
    with waiters.watch(job_id) as finish_notice:  # the last event comes at once, not at a poll
        while not await request.is_disconnected():
            snap = await run_in_threadpool(_snapshot, owner, job_id)
            kind = _change(last, snap)
            if kind:
                yield f"event: {kind}\ndata: {json.dumps(snap, default=str)}\n\n"
                last, quiet = snap, 0.0
            elif quiet >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet = 0.0
            if snap["status"] in FINISHED:
                return
            await until_event(finish_notice, POLL_S)
            quiet += POLL_S


def _change(last: dict[str, Any] | None, snap: dict[str, Any]) -> str | None:
    """`status` for a new status or attempt, `waiting` for a queued job's new reason or
    place in its queue, `progress` for new progress, else None."""
    if last is None or (last["status"], last["attempt"]) != (snap["status"], snap["attempt"]):
        return "status"
    if last["waiting"] != snap["waiting"]:
        return "waiting"
    before, now = last["progress"], snap["progress"]
    if (before["done"], before["total"]) != (now["done"], now["total"]):
        return "progress"
    return None


@router.get("/metrics", include_in_schema=True, response_class=Response)
def prometheus_metrics(request: Request, session: SessionDep) -> Response:
    """Prometheus exposition: jobs, queues, items, tokens, durations, workers, GPUs."""
    if not get_settings().metrics_public:
        get_owner(request, session)
    session.close()
    return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)
