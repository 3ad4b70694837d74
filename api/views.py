"""Rows to response models: the shapes the API returns."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect

from common.adapter_spec import AdapterSpec
from common.ml.pretrained import ModelSource
from common.models import Job, JobStatus, Model, utcnow
from common.schemas import JobOut, ModelAdapter, ModelOut, Progress

# The fields of JobOut that are columns of Job by the same name, shown as stored.
JOB_COLUMNS = sorted(JobOut.model_fields.keys() & inspect(Job).columns.keys())


def job_out(job: Job, waiting: dict[str, Any] | None = None) -> JobOut:
    return JobOut.model_validate({
        **{name: getattr(job, name) for name in JOB_COLUMNS},
        "waiting": waiting,
        "attempts": job.attempts_log or [],
        "progress": progress_of(job),
        "metrics": job.metrics or {},
        "result": job.result or {},
    })


def progress_of(job: Job) -> Progress:
    """done/total plus rate and ETA measured since the job started."""
    p = Progress(done=job.progress_done, total=job.progress_total, unit=job.progress_unit)
    if job.started_at and job.progress_done:
        end = job.finished_at or utcnow()
        elapsed = (end - job.started_at).total_seconds()
        if elapsed > 0:
            p.rate = round(job.progress_done / elapsed, 3)
            if job.status == JobStatus.running and p.rate > 0:
                p.eta_s = round(max(job.progress_total - job.progress_done, 0) / p.rate, 1)
    return p


def model_out(model: Model) -> ModelOut:
    return ModelOut(
        id=model.name,
        created=int(model.created_at.timestamp()),
        owned_by=model.owner,
        family=model.family,
        checkpoint_id=model.checkpoint_id,
        genq_id=model.id,
        created_by_job=model.created_by_job,
        source=ModelSource.model_validate(model.source) if model.source else None,
        adapter=ModelAdapter(spec=AdapterSpec.model_validate(model.adapter["spec"]),
                             base_stored=bool(model.adapter.get("base")))
        if model.adapter else None,
    )
