"""Celery tasks: claim the job's attempt, run its body, record the outcome. Nothing else."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from typing import Any

from billiard.common import terminate_handler_fired
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from common import fleet, jobs
from common.celery_app import get_celery
from common.db import session_factory
from common.errors import (
    Cancelled,
    CheckpointError,
    GenqError,
    LeaseLost,
    NanLoss,
    RetryableError,
    ShutdownRequested,
    StopForTimeout,
    Stopped,
)
from common.models import JobStatus
from worker.context import JobContext
from worker.frame_stack import call_on_fresh_chunk

log = logging.getLogger(__name__)
app = get_celery()
CLAIM_RETRY_S = 5
# runs in the main process when a pool child dies mid-job (worker/main.py)
LOST_CHILD = "worker.main:LostChildRequest"

Body = Callable[[JobContext], dict[str, Any]]


def run_job(task: Any, job_id: str, attempt: int, body: Body) -> str:
    """Claim (job_id, attempt) or drop the message; run body; map its ending to a transition."""
    try:
        return _run_job(task, job_id, attempt, body)
    except Exception as exc:  # e.g. a cleanup's database error while a SIGTERM unwinds
        exit_if_terminated(exc)
        raise


def _run_job(task: Any, job_id: str, attempt: int, body: Body) -> str:
    session = session_factory()()
    try:
        try:
            claim = jobs.claim_job(
                session, job_id, attempt,
                worker=task.request.hostname or fleet.this_worker(), pid=os.getpid(),
                task_id=task.request.id,
            )
        except SQLAlchemyError as exc:
            # The database is unreachable or locked: acking this message would strand the
            # job in `queued`, so send it again later (claims are idempotent).
            log.warning("job %s attempt %s: claim failed (%s); retrying in %ss",
                        job_id, attempt, exc.__class__.__name__, CLAIM_RETRY_S)
            raise task.retry(countdown=CLAIM_RETRY_S, max_retries=None) from exc
        if claim.job is None:
            log.info("job %s attempt %s: message dropped (%s)", job_id, attempt, claim.reason)
            return f"dropped: {claim.reason}"
        job = claim.job
        log.info("job %s attempt %s: %s", job.id, job.attempt, claim.reason)
        with JobContext(job=job, task=task, session=session) as ctx:
            return record(session, ctx, body)
    finally:
        session.close()


def record(session: Any, ctx: JobContext, body: Body) -> str:
    job = ctx.job
    try:
        result = run_body(ctx, body)
    except LeaseLost:
        return "lost the lease; another attempt owns the job"
    except Cancelled as stop:
        jobs.finish_job(session, job, status=JobStatus.cancelled, result=stop.partial)
        return JobStatus.cancelled.value
    except ShutdownRequested as stop:
        if ctx.preempted:
            reason = {"code": "preempted", "message": "a more urgent job needed the worker",
                      "retryable": True}
        else:
            reason = {"code": "shutdown", "message": "worker shut down", "retryable": True}
        jobs.requeue_job(session, job, reason={**reason, **stop.partial}, spend=False)
        return f"re-queued: {reason['code']}"
    except StopForTimeout as stop:
        error = {"code": "timeout", "message": f"ran past timeout_s={job.spec.get('timeout_s')}"}
        jobs.finish_job(session, job, status=JobStatus.failed, error=error, result=stop.partial)
        return "failed: timeout"
    except Exception as exc:
        error = failure_of(exc)
        if error["code"] == "internal_error":
            log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
        return _fail(ctx, session, error)
    jobs.finish_job(session, job, status=JobStatus.succeeded, result=result,
                    progress=ctx.final_progress())
    return f"succeeded: {summary(result)}"


def run_body(ctx: JobContext, body: Body) -> dict[str, Any]:
    """The job body's result, or its exception; SystemExit if a SIGTERM is unwinding it.

    The final progress lands before the status changes: with it in one UPDATE on success,
    just before it on any other way out."""
    try:
        try:
            # Celery calls this some 40 frames deep; see worker/frame_stack.py
            return call_on_fresh_chunk(body, ctx)
        finally:
            ctx.stop_heartbeat()
    except Exception as exc:
        exit_if_terminated(exc)
        if not isinstance(exc, Stopped):  # a stop's work is whole: its transition keeps it
            ctx.session.rollback()  # the error may have left a transaction half-done
        ctx.save_progress()
        raise


def exit_if_terminated(exc: BaseException) -> None:
    """Turn any error into SystemExit once this pool child's SIGTERM handler has fired.

    A forced cancel revokes the task with terminate=True: the worker SIGTERMs the child and
    billiard's handler raises SystemExit wherever the task is. Landing inside a database
    call, the cleanup can raise another error in its place (psycopg: "can't change
    'autocommit' now"). Recorded as the job's failure, that error would end the task
    normally and leave the child running; as SystemExit it passes Celery's tracer and
    billiard lets the child go, as the revoke asked.
    """
    if terminate_handler_fired():
        raise SystemExit(1) from exc


def _fail(ctx: JobContext, session: Any, error: dict[str, Any]) -> str:
    session.rollback()  # the error may have left a transaction half-done
    ctx.log(f"{error['code']}: {error['message']}", level="ERROR")
    return f"{jobs.fail_job(session, ctx.job, error)}: {error['code']}"


def failure_of(exc: Exception) -> dict[str, Any]:
    """The error recorded for a job body's exception (not a stop): deterministic errors fail
    the job at once, transient ones (`retryable`) re-queue it while attempts remain."""
    if isinstance(exc, NanLoss):
        return {"code": "nan_loss", "message": str(exc), "step": exc.step}
    if isinstance(exc, GenqError | CheckpointError | ValueError):
        return {"code": getattr(exc, "code", "invalid_spec"), "message": str(exc)}
    if isinstance(exc, DATABASE_UNAVAILABLE):
        # The connection broke or was refused (a restart, a failover), or the database stayed
        # locked: not the job's doing. Recorded once the database is back, it re-queues the job
        # as the reaper would have had the record failed too (SQLAlchemy's own `code` is a
        # link to its docs, not ours).
        return {"code": "database_unavailable", "message": repr(exc)[:2000], "retryable": True}
    if isinstance(exc, RetryableError | OSError | TimeoutError | ConnectionError):
        return _retryable(exc)
    if "out of memory" in str(exc).lower():
        return _retryable(exc, code="out_of_memory")
    return {"code": "internal_error", "message": repr(exc)[:2000]}


# psycopg's and sqlite3's OperationalError (a refused or dropped connection, "database is
# locked"), and a connection pool that had none to give in time.
DATABASE_UNAVAILABLE = (OperationalError, PoolTimeout)


def _retryable(exc: BaseException, code: str = "transient") -> dict[str, Any]:
    return {"code": getattr(exc, "code", code), "message": repr(exc)[:2000], "retryable": True}


def summary(result: dict[str, Any]) -> str:
    keys = ("model", "step", "items_done", "tokens_out", "output_file_id")
    return ", ".join(f"{k}={result[k]}" for k in keys if result.get(k) is not None)


@app.task(name="genq.train", bind=True, Request=LOST_CHILD)
def train(self: Any, job_id: str, attempt: int, **meta: Any) -> str:
    """Run one training job (args: job id, attempt; kwargs: family, model)."""
    from worker.training import execute_training

    return run_job(self, job_id, attempt, execute_training)


@app.task(name="genq.generate", bind=True, Request=LOST_CHILD)
def generate(self: Any, job_id: str, attempt: int, **meta: Any) -> str:
    """Run one generation job."""
    from worker.generation import execute_items

    return run_job(self, job_id, attempt, execute_items)


@app.task(name="genq.batch_shard", bind=True, Request=LOST_CHILD)
def batch_shard(self: Any, job_id: str, attempt: int, **meta: Any) -> str:
    """Run one shard of a batch."""
    from worker.generation import execute_items

    return run_job(self, job_id, attempt, execute_items)


@app.task(name="genq.prepare_batch", bind=True, Request=LOST_CHILD)
def prepare_batch(self: Any, job_id: str, attempt: int, **meta: Any) -> str:
    """Read a batch's input file into shards."""
    from worker.generation import execute_prepare

    return run_job(self, job_id, attempt, execute_prepare)


@app.task(name="genq.noop")
def noop() -> None:
    """Does nothing: the raw-Celery baseline of the queue-overhead benchmark."""


@app.task(name="genq.raw_generate")
def raw_generate(model_id: str, gen: dict[str, Any]) -> None:
    """One request through the model cache and common.ml.generate, with no job around it:
    the queue-overhead benchmark's raw-Celery baseline doing a minimal job's work."""
    from common.ml.generate import GenRequest, generate
    from worker.device import current_device
    from worker.model_cache import get_model

    with session_factory()() as session:  # read only on the model's first load
        loaded = get_model(session, model_id, current_device())
    generate(loaded, [GenRequest.model_validate({**gen, "key": "0"})],
             on_outputs=lambda outputs: None)
