"""The workers table: registration, heartbeats and who is alive."""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from common.config import get_settings
from common.models import Job, JobStatus, Worker, utcnow


def this_worker() -> str:
    return socket.gethostname()


def register_worker(
    session: Session, *, hostname: str, queues: list[str], device: dict[str, Any], pid: int,
    version: str,
) -> None:
    """Insert or refresh this worker's row."""
    row = session.get(Worker, hostname) or Worker(hostname=hostname)
    row.queues = ",".join(queues)
    row.device = device
    row.pid = pid
    row.version = version
    row.started_at = utcnow()
    row.heartbeat_at = utcnow()
    session.add(row)
    session.commit()


def worker_heartbeat(session: Session, *, hostname: str) -> None:
    session.execute(update(Worker).where(Worker.hostname == hostname).values(heartbeat_at=utcnow()))
    session.commit()


def current_jobs(session: Session, hostnames: list[str], *,
                 owner: str | None = None) -> dict[str, str]:
    """The job each of these workers runs now (only `owner`'s, if given): its running attempt
    claimed under the worker's name, read from the jobs, so that running a job costs the
    workers table no write."""
    if not hostnames:
        return {}
    query = select(Job.worker, Job.id).where(Job.status == JobStatus.running,
                                             Job.worker.in_(hostnames))
    if owner is not None:
        query = query.where(Job.owner == owner)
    # a dead pool child's attempt stays `running` until it is taken over: the latest counts
    return {worker: job_id for worker, job_id in session.execute(query.order_by(Job.started_at))
            if worker is not None}


def unregister_worker(session: Session, *, hostname: str) -> None:
    row = session.get(Worker, hostname)
    if row is not None:
        session.delete(row)
        session.commit()


def _alive() -> ColumnElement[bool]:
    return Worker.heartbeat_at >= utcnow() - timedelta(seconds=get_settings().lease_s)


def live_workers(session: Session) -> list[Worker]:
    """Workers whose heartbeat is within the lease."""
    return list(session.scalars(select(Worker).where(_alive()).order_by(Worker.hostname)))


def live_gpu_worker(session: Session) -> bool:
    # two columns, not the ORM rows: every job created with queue "auto" asks
    rows = session.execute(select(Worker.device, Worker.queues).where(_alive()))
    return any(str((device or {}).get("type", "")).startswith("cuda")
               and "gpu" in queues.split(",") for device, queues in rows)


def resolve_queue(session: Session, queue: str) -> str:
    """`auto` means gpu when a live GPU worker is registered, else cpu."""
    if queue != "auto":
        return queue
    return "gpu" if live_gpu_worker(session) else "cpu"
