"""/v1/workers: live workers with queues, device and current job."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import OwnerDep, SessionDep
from api.json_body import GenqRoute
from common.fleet import current_jobs, live_workers

router = APIRouter(tags=["workers"], route_class=GenqRoute)


class WorkerOut(BaseModel):
    hostname: str
    queues: list[str]
    device: dict[str, Any]
    pid: int
    version: str
    started_at: datetime
    heartbeat_at: datetime
    current_job: str | None


class WorkerList(BaseModel):
    object: str = "list"
    data: list[WorkerOut]


@router.get("/v1/workers", response_model=WorkerList)
def list_workers(session: SessionDep, owner: OwnerDep) -> WorkerList:
    """Workers whose heartbeat is within the lease; a current job shows to its owner only."""
    workers = live_workers(session)
    mine = current_jobs(session, [w.hostname for w in workers], owner=owner)
    return WorkerList(data=[
        WorkerOut(hostname=w.hostname, queues=w.queues.split(","), device=w.device, pid=w.pid,
                  version=w.version, started_at=w.started_at, heartbeat_at=w.heartbeat_at,
                  current_job=mine.get(w.hostname))
        for w in workers
    ])
