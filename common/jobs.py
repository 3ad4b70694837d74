"""The job state machine (DESIGN.md §3): create, dispatch, claim, heartbeat, finish, retry, cancel.

Every transition is one conditional UPDATE keyed on (id, attempt, status), so a stale
message, a second worker or a late reaper can never move a job it does not own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from pydantic import ValidationError
from sqlalchemy import BindParameter, Update, and_, bindparam, exists, func, or_, select, update
from sqlalchemy.orm import Session

from common.batches.finalize import child_finished
from common.celery_app import get_celery
from common.chat import as_dicts, render_fallback
from common.config import get_settings
from common.db import rows_changed
from common.dispatch import dispatch, release_held
from common.errors import Conflict, InvalidSpec, pydantic_problems
from common.family_names import canonical_family
from common.files import get_file
from common.fleet import live_workers, resolve_queue
from common.gen_params import ItemInput, unsupported_fields
from common.idempotency import create_once
from common.ml.prompt_ids import load_chat_render
from common.models import (
    FINISHED,
    Checkpoint,
    Item,
    ItemStatus,
    Job,
    JobStatus,
    JobType,
    Lock,
    Model,
    Quota,
    new_id,
    utcnow,
)
from common.notices import announce_finished
from common.owned import get_owned
from common.results import find_model, insert_items
from common.schemas import GenerateSpec, TrainJobSpec
from common.storage import get_storage
from common.train_spec import family_kind, generation_kind, takes_prompts

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- create & dispatch


def get_job(session: Session, *, owner: str | None, job_id: str) -> Job:
    """A job by id, scoped to its owner (another owner's job is not found)."""
    return get_owned(session, Job, job_id, owner=owner, what="job", param="job_id")


def create_job(
    session: Session,
    *,
    owner: str,
    spec: TrainJobSpec | GenerateSpec,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Write a queued job (and its items) and commit; returns (job, created)."""
    spec_json = spec.model_dump(mode="json", exclude_none=True)
    # An explicit null means something ("clip": null is no clipping): keep it.
    spec_json.update({k: None for k in spec.model_fields_set if getattr(spec, k) is None})
    return create_once(
        session, owner=owner, key=idempotency_key, spec=spec_json,
        create=lambda: (_write_job(session, owner=owner, spec=spec, spec_json=spec_json,
                                   idempotency_key=idempotency_key), True),
        replay=lambda existing: (existing, False),
    )


def _write_job(session: Session, *, owner: str, spec: TrainJobSpec | GenerateSpec,
               spec_json: dict[str, Any], idempotency_key: str | None) -> Job:
    settings = get_settings()
    job = Job(
        id=new_id("job_"),
        owner=owner,
        type=spec.type,
        spec=spec_json,
        idempotency_key=idempotency_key,
        priority=spec.priority,
        max_attempts=spec.max_attempts or settings.max_attempts,
        queue=resolve_queue(session, spec.queue),
    )
    requests = None
    if isinstance(spec, TrainJobSpec):
        _prepare_train(session, job, spec)
    else:
        _prepare_generate(session, job, spec)
        requests = generate_requests(spec, prompts=_prompts(session, job, spec))
        job.progress_total = len(requests)  # in the INSERT: no UPDATE after the items
    session.add(job)
    session.flush()
    if requests is not None:
        insert_items(session, job.id, requests, set_total=False)
    session.commit()
    return job


def _prepare_train(session: Session, job: Job, spec: TrainJobSpec) -> None:
    job.family = spec.family
    job.progress_unit = "step"
    job.progress_total = spec.steps or 0
    if spec.data and spec.data.file_id:
        check_dataset(session, owner=job.owner, file_id=spec.data.file_id, family=spec.family)
    if spec.resume_from:
        ckpt = get_owned(session, Checkpoint, spec.resume_from, owner=job.owner,
                         what="checkpoint", param="resume_from")
        family = session.scalar(select(Job.family).where(Job.id == ckpt.job_id))
        if canonical_family(family or "") != canonical_family(spec.family):
            raise InvalidSpec(f"checkpoint {ckpt.id} is a {family} model, not {spec.family}",
                              param="resume_from")
    if spec.name:
        taken = session.scalar(
            select(Model.id).where(Model.owner == job.owner, Model.name == spec.name)
        )
        if taken:
            raise Conflict(f"a model named {spec.name!r} exists", param="name")


def check_dataset(session: Session, *, owner: str, file_id: str, family: str) -> None:
    """Load an uploaded dataset as the worker will: a bad one is a 422 before anything runs."""
    from common.files import dataset_path
    from common.ml.data import validate_data

    file = get_file(session, owner=owner, file_id=file_id, param="data.file_id")
    if file.purpose != "dataset":
        raise InvalidSpec(f"file {file_id} has purpose {file.purpose!r}, not 'dataset'",
                          param="data.file_id")
    local = dataset_path(get_storage(), file, get_settings().home_dir / "cache")
    problems = validate_data({"path": str(local)}, family_kind(family))
    if problems:
        message = "; ".join(p.replace(str(local), file.filename).replace(local.name, file.filename)
                            .removeprefix("data.path: ") for p in problems)
        raise InvalidSpec(f"dataset {file_id}: {message}", param="data.file_id")


def _prepare_generate(session: Session, job: Job, spec: GenerateSpec) -> None:
    model = find_model(session, owner=job.owner, name=spec.model)
    job.family = model.family
    job.model_id = model.id
    job.progress_unit = "item"
    kind = family_kind(model.family)
    if kind == "text" and not (spec.prompts or spec.chats):
        raise InvalidSpec(f"{model.name} is a text model: give prompts or chats", param="prompts")
    if takes_prompts(model.family) and kind == "image":
        if not spec.prompts or spec.chats or spec.labels:
            raise InvalidSpec(f"{model.name} is a text-to-image model: give prompts (and n "
                              "images for each)", param="labels" if spec.labels else "prompts")
    elif kind == "image" and (spec.prompts or spec.chats):
        raise InvalidSpec(f"{model.name} is an image model: give n or labels",
                          param="prompts" if spec.prompts else "chats")
    _check_fields(model, spec)


def _check_fields(model: Model, spec: GenerateSpec) -> None:
    """A parameter the model cannot honour (e.g. steps for a text model) is a 422 now."""
    problems = unsupported_fields(generation_kind(model.family),
                                  ItemInput(**spec.params.model_dump()))
    if problems:
        raise InvalidSpec(problems[0], param=problems[0].split(":", 1)[0])


def _prompts(session: Session, job: Job, spec: GenerateSpec) -> list[str] | None:
    """The spec's prompts, or its chats rendered for generation with the model's template."""
    if not spec.chats:
        return spec.prompts
    model = session.get(Model, job.model_id)
    checkpoint = session.get(Checkpoint, model.checkpoint_id) if model else None
    render = load_chat_render(get_storage(), checkpoint.uri) if checkpoint else render_fallback
    prompts = []
    for i, chat in enumerate(spec.chats):
        try:
            prompt = render(as_dicts(chat), True)
            prompts.append(ItemInput(prompt=prompt).prompt or "")
        except ValidationError as exc:  # the prompt cap, which a template can cross
            raise InvalidSpec(f"chats[{i}]: {'; '.join(pydantic_problems(exc))}",
                              param=f"chats[{i}]") from None
        except Exception as exc:  # a template's own raise_exception, or a jinja error
            raise InvalidSpec(f"chats[{i}]: the model's chat template refused it ({exc})",
                              param=f"chats[{i}]") from None
    return prompts


def generate_requests(spec: GenerateSpec, *, prompts: list[str] | None) -> list[dict[str, Any]]:
    """One item request per prompt, label or image of a generate spec."""
    params = spec.params.model_dump()
    if prompts:
        n = spec.n or 1  # completions, or images, for each prompt
        return [{"gen": ItemInput(prompt=p, n=n, **params).model_dump()} for p in prompts]
    labels: list[int | None] = [*spec.labels] if spec.labels else [None]
    if spec.n is not None and len(labels) == 1:
        labels *= spec.n  # one label (or none) applies to every image
    return [{"gen": ItemInput(label=label, **params).model_dump()} for label in labels]


def sweep_outbox(session: Session, *, min_age_s: float = 10.0) -> int:
    """Send queued jobs whose message never reached the broker or whose back-off is over.
    A job younger than min_age_s is left to the API that is sending it, unless it waits
    out a retry back-off: nobody else sends that one, so it goes as soon as the wait ends.
    Batch shards without a message are release_shards' (common/dispatch.py), and jobs of
    owners with a quota release_held's, not this."""
    now = utcnow()
    jobs = session.scalars(
        select(Job)
        .where(
            Job.status == JobStatus.queued,
            Job.enqueued_at.is_(None),
            Job.type.not_in([JobType.batch, JobType.shard]),
            Job.cancel_requested.is_(False),
            Job.owner.not_in(select(Quota.owner)),  # those are release_held's
            or_(Job.not_before.is_(None), Job.not_before <= now),
            or_(Job.not_before.is_not(None),
                Job.created_at <= now - timedelta(seconds=min_age_s)),
        )
        .order_by(Job.priority.desc(), Job.created_at)
        .limit(500)
    ).all()
    return sum(dispatch(session, job) for job in jobs)


def resend_stranded(session: Session, *, lease_s: float, waiting: Callable[[str], int],
                    fetched: Callable[[], set[str]] = set,
                    now: datetime | None = None) -> list[str]:
    """Send again the queued jobs whose message left the broker's queue but was never
    claimed: a worker that died after its main process fetched the message (before the
    pool child claimed the job) leaves it in Redis's unacked hash until the visibility
    timeout (12 h). A job sent a lease ago is sent again when its message is among those
    fetched a lease ago and never acknowledged (`fetched()`, task ids), however many
    messages wait behind it, or when its queue has no message waiting (`waiting(queue)`
    is 0: a message lost from the broker), so a backlog is never sent twice. The stranded
    message, should it come back, finds the job claimed and is dropped."""
    now = now or utcnow()
    candidates = session.scalars(
        select(Job)
        .where(
            Job.status == JobStatus.queued,
            Job.enqueued_at.is_not(None),
            Job.enqueued_at < now - timedelta(seconds=lease_s),
            Job.type != JobType.batch,
            Job.cancel_requested.is_(False),
            or_(Job.not_before.is_(None), Job.not_before <= now),
        )
        .order_by(Job.priority.desc(), Job.created_at)
        .limit(500)
    ).all()
    stranded = fetched() if candidates else set()
    idle: dict[str, bool] = {}
    sent = []
    for job in candidates:
        if job.celery_task_id not in stranded and job.queue not in idle:
            idle[job.queue] = waiting(job.queue) == 0
        age = now - job.enqueued_at if job.enqueued_at else None  # before dispatch resets it
        if (job.celery_task_id in stranded or idle[job.queue]) and dispatch(session, job):
            log.warning("job %s: queued %s ago and never claimed; sent again", job.id, age)
            sent.append(job.id)
    return sent


# ---------------------------------------------------------------- claim & run


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def same_host(a: str | None, b: str) -> bool:
    """Two Celery node names (`node@host`) on one machine, where a pid can be checked."""
    return a is not None and a.rpartition("@")[2] == b.rpartition("@")[2]


@dataclass
class Claim:
    job: Job | None
    reason: str  # "claimed", "taken_over", or why the message was dropped


@cache
def _claim_statement() -> Update:
    """The claim's UPDATE, built once (every message runs it; building it took a third of
    its time): queued at this attempt and not cancelled → running for this process."""
    now: BindParameter[datetime] = bindparam("b_now")
    return (
        update(Job)
        .where(
            Job.id == bindparam("b_job_id"),
            Job.attempt == bindparam("b_attempt"),
            Job.status == JobStatus.queued,
            Job.cancel_requested.is_(False),
        )
        .values(
            status=JobStatus.running,
            worker=bindparam("b_worker"),
            worker_pid=bindparam("b_pid"),
            celery_task_id=bindparam("b_task_id"),
            started_at=func.coalesce(Job.started_at, now),
            heartbeat_at=now,
            shutdown_requested=False,
            preempt_requested=False,
        )
        .returning(Job)
    )


def claim_job(
    session: Session, job_id: str, attempt: int, *, worker: str, pid: int, task_id: str | None
) -> Claim:
    """Move (job_id, attempt) from queued to running for this process, or say why not.

    The claim is one UPDATE … RETURNING the row (SQLite ≥ 3.35 and PostgreSQL): the usual
    case, a queued job, costs that statement and its commit; only a dropped message or a
    takeover reads the row again to say why."""
    now = utcnow()
    claimed = session.scalars(
        _claim_statement(),
        {"b_job_id": job_id, "b_attempt": attempt, "b_worker": worker, "b_pid": pid,
         "b_task_id": task_id, "b_now": now},
        execution_options={"synchronize_session": False, "populate_existing": True},
    ).one_or_none()
    session.commit()
    if claimed is not None:
        return Claim(claimed, "claimed")
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return Claim(None, "unknown job")
    if job.status == JobStatus.queued and job.cancel_requested and job.attempt == attempt:
        finish_job(session, job, status=JobStatus.cancelled, from_status=JobStatus.queued)
        return Claim(None, "cancelled while queued")
    # A takeover moves SQL to attempt+1 while the redelivered message keeps its attempt and
    # task id: a later redelivery of that same message may take over again.
    if (
        job.status == JobStatus.running
        and (job.attempt == attempt or (task_id is not None and job.celery_task_id == task_id))
        and same_host(job.worker, worker)
        and job.worker_pid != pid
        and not pid_alive(job.worker_pid)
    ):
        return _take_over(session, job, worker=worker, pid=pid, task_id=task_id)
    return Claim(None, f"stale message: job is {job.status} at attempt {job.attempt}")


def _take_over(session: Session, job: Job, *, worker: str, pid: int, task_id: str | None) -> Claim:
    """A redelivered message whose previous process on this host died: a new attempt, which
    spends one of max_attempts only if the dead one made no durable progress."""
    error = {"code": "worker_lost", "message": f"process {job.worker_pid} died", "retryable": True}
    progress = durable_progress(session, job)
    failures = job.failures + (0 if advanced(job, progress) else 1)
    if failures >= job.max_attempts:
        fail_job(session, job, error, final=True)
        return Claim(None, "attempts exhausted")
    taken = rows_changed(
        session,
        update(Job)
        .where(Job.id == job.id, Job.attempt == job.attempt, Job.worker_pid == job.worker_pid)
        .values(
            attempt=job.attempt + 1,
            failures=failures,
            attempts_log=[*job.attempts_log,
                          {"attempt": job.attempt, "error": error, "progress": progress}],
            worker=worker,
            worker_pid=pid,
            celery_task_id=task_id,
            heartbeat_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    session.refresh(job)
    return Claim(job, "taken_over") if taken == 1 else Claim(None, "lost the takeover race")


def recover_lost_child(session: Session, job_id: str, attempt: int, *,
                       worker: str) -> JobStatus | None:
    """The worker's main process saw its pool child die while running (job_id, attempt):
    fail that attempt as worker_lost now, so the job is queued again at once (behind any
    backlog) instead of waiting for its lease or for the rejected message to come round.
    None when the job is not this worker's running attempt under a dead process (the child
    died after finishing it, or had dropped the message): the message is then rejected as
    before and its redelivery finds the job where it is."""
    job = session.get(Job, job_id)
    if (
        job is None
        or job.status != JobStatus.running
        or job.attempt != attempt
        or job.worker != worker
        or pid_alive(job.worker_pid)
    ):
        return None
    if job.cancel_requested:
        finish_job(session, job, status=JobStatus.cancelled)
        return JobStatus.cancelled
    error = {"code": "worker_lost", "message": f"pool process {job.worker_pid} died",
             "retryable": True}
    return fail_job(session, job, error)


@dataclass
class Signals:
    cancel: bool = False
    shutdown: bool = False
    preempt: bool = False  # stop as for a shutdown; the attempt ends `preempted`
    lost: bool = False  # the job is no longer ours (reaped, finished or re-queued)


def heartbeat(
    session: Session,
    job: Job,
    *,
    done: int | None = None,
    total: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> Signals:
    """Refresh the lease and progress; returns the flags the runner must obey."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if done is not None:
        values["progress_done"] = done
    if total is not None:
        values["progress_total"] = total
    if metrics is not None:
        values["metrics"] = metrics
    updated = rows_changed(
        session,
        update(Job)
        .where(Job.id == job.id, Job.attempt == job.attempt, Job.status == JobStatus.running)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if updated != 1:
        return Signals(lost=True)
    return read_signals(session, job)


def read_signals(session: Session, job: Job) -> Signals:
    """The cancel / shutdown flags of the job's current attempt (lost if it is not ours)."""
    row = session.execute(
        select(Job.cancel_requested, Job.shutdown_requested, Job.preempt_requested,
               Job.attempt, Job.status).where(Job.id == job.id)
    ).one()
    session.commit()  # end the read transaction: SQLite must not pin an old snapshot
    if row.attempt != job.attempt or row.status != JobStatus.running:
        return Signals(lost=True)
    return Signals(cancel=bool(row.cancel_requested), shutdown=bool(row.shutdown_requested),
                   preempt=bool(row.preempt_requested))


def finish_job(
    session: Session,
    job: Job,
    *,
    status: JobStatus,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    from_status: JobStatus = JobStatus.running,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Record a final status for the job's current attempt; False if it was not ours.
    `progress` (progress_done, progress_total, metrics) lands in the same UPDATE."""
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "heartbeat_at": utcnow()}
    if progress:
        values.update(progress)
    if result is not None:
        values["result"] = {**(job.result or {}), **result}
    if error is not None:
        values["error"] = error
    moved = _move_attempt(session, job, from_status, values)
    if moved:
        announce_finished(job.id)
    if moved and job.parent_id:
        child_finished(session, job)
    if moved and moved.owner_has_quota:
        _release_owners_next(session, job.owner)
    return bool(moved)


def _release_owners_next(session: Session, owner: str) -> None:
    """The place the finished job held under its owner's quota goes to their next job; on
    any failure the reaper's round sends it instead."""
    try:
        release_held(session, owner)
    except Exception as exc:
        session.rollback()
        log.warning("owner %s: held jobs left to the reaper's round: %s", owner, exc)


def fail_job(session: Session, job: Job, error: dict[str, Any], *,
             final: bool = False) -> JobStatus:
    """Fail the attempt: re-queue with back-off if retryable and attempts remain, else fail.

    Only attempts that made no durable progress count against max_attempts: they are the
    evidence of a job that crashes its worker; one killed after committing work is not.
    """
    error = {"retryable": False, **error}
    progress = durable_progress(session, job)
    spend = not advanced(job, progress)
    failures = job.failures + (1 if spend else 0)
    log_entry = {"attempt": job.attempt, "error": error, "progress": progress}
    if error["retryable"] and not final and failures < job.max_attempts:
        delay = get_settings().retry_backoff_s * 2 ** max(failures - 1, 0)
        requeue_job(session, job, reason=error, spend=spend, delay_s=delay, progress=progress)
        return JobStatus.queued
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.attempt == job.attempt)
        .values(failures=failures, attempts_log=[*job.attempts_log, log_entry])
        .execution_options(synchronize_session=False)
    )
    finish_job(session, job, status=JobStatus.failed, error=error)
    return JobStatus.failed


def requeue_job(
    session: Session,
    job: Job,
    *,
    reason: dict[str, Any],
    spend: bool,
    delay_s: float = 0.0,
    from_status: JobStatus = JobStatus.running,
    progress: int | None = None,
) -> bool:
    """Put the job back in its queue as a new attempt (spend=False: a soft shutdown)."""
    if progress is None:
        progress = durable_progress(session, job)
    values: dict[str, Any] = {
        "status": JobStatus.queued,
        "attempt": job.attempt + 1,
        "worker": None,
        "worker_pid": None,
        "enqueued_at": None,
        "shutdown_requested": False,
        "preempt_requested": False,
        "not_before": utcnow() + timedelta(seconds=delay_s) if delay_s else None,
        "attempts_log": [*job.attempts_log,
                         {"attempt": job.attempt, "error": reason, "progress": progress}],
    }
    if spend:
        values["failures"] = job.failures + 1
    moved = _move_attempt(session, job, from_status, values)
    if moved and not delay_s:
        dispatch(session, job)
    return bool(moved)


def durable_progress(session: Session, job: Job) -> int:
    """What an attempt leaves for the next one: items finished, the last checkpoint's step, or
    the input lines a batch's preparing job has written as shards."""
    if job.type == JobType.prepare:
        result = session.scalar(select(Job.result).where(Job.id == job.id)) or {}
        return int(result.get("lines_done", 0))
    if job.type == JobType.train:
        step = select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job.id)
        return session.scalar(step) or 0
    done = select(func.count()).select_from(Item).where(Item.job_id == job.id,
                                                       Item.status != ItemStatus.pending)
    return session.scalar(done) or 0


def advanced(job: Job, progress: int) -> bool:
    """Whether the attempt ending now made durable progress past the previous attempt's."""
    before = next((entry["progress"] for entry in reversed(job.attempts_log or [])
                   if "progress" in entry), 0)
    return progress > before


@dataclass
class Moved:
    """What _move_attempt did: whether the attempt was ours to move, and whether its owner
    has a quota (then a place may have freed for a held job)."""

    moved: bool
    owner_has_quota: bool = False

    def __bool__(self) -> bool:
        return self.moved


@cache
def _move_statement(columns: tuple[str, ...]) -> Update:
    """_move_attempt's UPDATE setting these columns, built once for each set (a job's
    finish is one of a few)."""
    return (
        update(Job)
        .where(Job.id == bindparam("b_id"), Job.attempt == bindparam("b_attempt"),
               Job.status == bindparam("b_from"))
        .values({column: bindparam(f"v_{column}") for column in columns})
        .returning(Job, exists().where(Quota.owner == Job.owner))
    )


def _move_attempt(
    session: Session, job: Job, from_status: JobStatus, values: dict[str, Any]
) -> Moved:
    """One conditional UPDATE of the job's current attempt in from_status, RETURNING the row
    (which refreshes `job`) and whether its owner has a quota, then commit; an attempt
    that was not ours is read back as it now is."""
    row = session.execute(
        _move_statement(tuple(sorted(values))),
        {"b_id": job.id, "b_attempt": job.attempt, "b_from": from_status,
         **{f"v_{column}": value for column, value in values.items()}},
        execution_options={"synchronize_session": False, "populate_existing": True},
    ).one_or_none()
    session.commit()
    if row is None:
        session.refresh(job)
        return Moved(False)
    return Moved(True, owner_has_quota=bool(row[1]))


# ---------------------------------------------------------------- cancel


def cancel_job(session: Session, *, owner: str, job_id: str) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next step or batch."""
    job = get_job(session, owner=owner, job_id=job_id)
    if JobStatus(job.status) in FINISHED:
        return job
    flag = update(Job).where(
        Job.status.in_([JobStatus.queued, JobStatus.running])).values(cancel_requested=True)
    # The parent's flag first, its children read after, in the same transaction: a batch's
    # window of shards being written (batches/create.py) waits for this, then finds the flag
    # and writes nothing, or commits first and its shards are read here.
    session.execute(flag.where(Job.id == job.id))
    children = session.scalars(select(Job).where(Job.parent_id == job.id)).all()
    stopped = []  # shards this call moved to cancelled: each is counted on the parent once
    cancelled = []  # other jobs it moved to cancelled
    for target in [job, *children]:
        if target is not job:
            session.execute(flag.where(Job.id == target.id))
        moved = rows_changed(
            session,
            update(Job)
            .where(Job.id == target.id, Job.status == JobStatus.queued, Job.type != JobType.batch)
            .values(status=JobStatus.cancelled, finished_at=utcnow())
        )
        if moved and target.parent_id:
            stopped.append(target)
        elif moved:
            cancelled.append(target.id)
    session.commit()
    for job_id in cancelled:
        announce_finished(job_id)
    for child in stopped:
        child_finished(session, child)
    session.refresh(job)
    return job


def schedule_force_cancel(session: Session, job: Job, *, grace_s: float) -> bool:
    """cancel?force=true: note in SQL when the running attempt is to be terminated, so the
    reaper does it even if the API that was asked restarts; False if it is not running."""
    scheduled = rows_changed(
        session,
        update(Job)
        .where(Job.id == job.id, Job.attempt == job.attempt, Job.status == JobStatus.running)
        .values(force_cancel_at=utcnow() + timedelta(seconds=grace_s))
    )
    session.commit()
    return scheduled == 1


def force_overdue(session: Session) -> list[str]:
    """Terminate the running attempts whose forced cancel is due (the reaper's round)."""
    due = session.execute(
        select(Job.id, Job.attempt).where(Job.status == JobStatus.running,
                                          Job.force_cancel_at <= utcnow())
    ).all()
    session.commit()
    return [job_id for job_id, attempt in due
            if force_cancel(session, job_id=job_id, attempt=attempt)]


def force_cancel(session: Session, *, job_id: str, attempt: int) -> bool:
    """After the grace period: terminate an attempt that ignored its cancel flag; True if it did.

    revoke(terminate=True) makes the worker SIGTERM the task's pool child (SystemExit in the
    task, message acked); the row is finished here since that attempt can no longer do it.
    """
    job = session.get(Job, job_id)
    if job is None or job.attempt != attempt or job.status != JobStatus.running:
        return False
    if job.celery_task_id:
        get_celery().control.revoke(job.celery_task_id, terminate=True, signal="SIGTERM")
    log.warning("job %s attempt %s: still running after cancel; revoked", job.id, attempt)
    return finish_job(session, job, status=JobStatus.cancelled, result={"forced": True})


def preempt_for_urgent(session: Session, *, after_s: float,
                       now: datetime | None = None) -> list[str]:
    """Ask running jobs to give their worker to an urgent one (the reaper's round).

    On each queue, the most urgent job sent at least `after_s` ago and still waiting takes
    a worker when every live worker of the queue runs a job of lower priority: the lowest
    of those that is preemptible (its spec allows it, priority below 9), the latest started
    among equals, is flagged. It stops at its next step or item chunk as for a soft
    shutdown (training checkpoints first), goes back to `queued` without spending an
    attempt, and resumes later; the freed worker takes the urgent job, whose message comes
    first. One preemption per queue at a time."""
    if after_s <= 0:
        return []
    now = now or utcnow()
    live = live_workers(session)
    flagged = []
    for queue in get_settings().queue_names:
        job = session.scalars(
            select(Job)
            .where(Job.queue == queue, Job.status == JobStatus.queued,
                   Job.type != JobType.batch, Job.enqueued_at.is_not(None),
                   Job.enqueued_at < now - timedelta(seconds=after_s),
                   Job.cancel_requested.is_(False))
            .order_by(Job.priority.desc(), Job.enqueued_at)
            .limit(1)
        ).first()
        if job is None:
            continue
        hosts = [w.hostname for w in live if queue in w.queues.split(",")]
        if not hosts:
            continue  # nobody to preempt for: the job waits for a worker
        running = session.scalars(
            select(Job).where(Job.status == JobStatus.running, Job.worker.in_(hosts))
        ).all()
        busy = {r.worker for r in running}
        if (set(hosts) - busy or any(r.preempt_requested for r in running)
                or any(r.priority >= job.priority for r in running)):
            continue  # a worker is free or about to be, or one runs work as urgent
        victims = [r for r in running if r.priority < 9 and r.spec.get("preemptible", True)
                   and r.type != JobType.batch]
        if not victims:
            continue
        victim = min(victims, key=lambda r: (r.priority, -(r.started_at or now).timestamp()))
        if rows_changed(session, update(Job).where(
                Job.id == victim.id, Job.attempt == victim.attempt,
                Job.status == JobStatus.running).values(preempt_requested=True)):
            log.warning("job %s (priority %s) preempted for job %s (priority %s, waiting "
                        "since %s)", victim.id, victim.priority, job.id, job.priority,
                        job.enqueued_at)
            flagged.append(victim.id)
        session.commit()
    return flagged


def request_shutdown(session: Session, *, worker: str) -> int:
    """Flag this worker's running jobs: checkpoint and re-queue at the next step."""
    n = rows_changed(
        session,
        update(Job)
        .where(Job.worker == worker, Job.status == JobStatus.running)
        .values(shutdown_requested=True)
    )
    session.commit()
    return n


# ---------------------------------------------------------------- reaper


def take_lease(session: Session, name: str, holder: str, ttl_s: float) -> bool:
    """Hold the named lock for ttl_s: one conditional UPDATE (or the first INSERT) wins."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    won = rows_changed(
        session,
        update(Lock)
        .where(Lock.name == name, or_(Lock.holder == holder, Lock.expires_at < now))
        .values(holder=holder, expires_at=expires)
    )
    if won == 0 and session.get(Lock, name) is None:
        try:
            session.add(Lock(name=name, holder=holder, expires_at=expires))
            session.commit()
            return True
        except Exception:
            session.rollback()
            return False
    session.commit()
    return won == 1


def reap(session: Session, *, lease_s: float, now: datetime | None = None) -> list[str]:
    """Re-queue (or fail) running jobs whose heartbeat is older than the lease."""
    now = now or utcnow()
    stale = session.scalars(
        select(Job).where(
            Job.status == JobStatus.running,
            Job.type != JobType.batch,
            and_(
                Job.heartbeat_at.is_not(None), Job.heartbeat_at < now - timedelta(seconds=lease_s)
            ),
        )
    ).all()
    reaped = []
    for job in stale:
        error = {
            "code": "worker_lost",
            "message": f"no heartbeat from {job.worker} pid {job.worker_pid} for {lease_s:.0f}s",
            "retryable": True,
        }
        if job.cancel_requested:
            finish_job(session, job, status=JobStatus.cancelled)
        else:
            log.warning("reaping job %s (attempt %s)", job.id, job.attempt)
            fail_job(session, job, error)
        reaped.append(job.id)
    return reaped
