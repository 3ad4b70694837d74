"""Finishing a batch: shards count themselves on the parent, the last one writes the output
and error files (OpenAI's JSONL lines) and completes the parent."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import String, Text, cast, exists, select, type_coerce, update
from sqlalchemy.orm import Session, aliased

from common.batches.schemas import IMAGE_ENDPOINT
from common.batches.views import count_items
from common.config import get_settings
from common.db import rows_changed
from common.dispatch import release_shards
from common.fleet import this_worker
from common.models import (
    FINISHED,
    Artifact,
    File,
    Item,
    ItemStatus,
    Job,
    JobStatus,
    JobType,
    new_id,
    utcnow,
)
from common.notices import announce_finished
from common.storage import Storage, get_storage

log = logging.getLogger(__name__)


def child_finished(session: Session, job: Job) -> None:
    """A batch's child job reached a final status: a shard counts itself, the preparing job
    settles the shard count (or ends the batch it could not prepare)."""
    if job.type == JobType.prepare:
        prepare_ended(session, job)
    else:
        shard_finished(session, job)


def prepare_ended(session: Session, job: Job) -> None:
    """The preparing job ended. Succeeded: every shard is written and shards_total is exact,
    so if the shards all finished first, finalize here. Failed or cancelled: a batch still
    validating ends with it; one part sharded stops at the shards written (the rest of the
    file never runs), cancelling those not started, and finalizes with what they made."""
    session.refresh(job)
    parent = session.get(Job, job.parent_id)
    assert parent is not None
    session.refresh(parent)
    ended = JobStatus(job.status)
    if JobStatus(parent.status).finished:  # its file was bad: failed with its line errors
        return
    validating = parent.status == JobStatus.queued
    why = "preparing the batch failed" if validating else "only part of the file was sharded"
    error = {"code": "preparation_failed", "retryable": False,
             "message": f"{why}: {(job.error or {}).get('message', '')}".strip()}
    if validating:
        stop: dict[str, Any] = {"status": JobStatus.cancelled if ended == JobStatus.cancelled else
                                JobStatus.failed, "finished_at": utcnow()}
        if ended == JobStatus.failed:
            stop["error"] = error
        moved = rows_changed(session, update(Job).where(
            Job.id == parent.id, Job.status == JobStatus.queued).values(**stop))
        session.commit()
        if moved:
            announce_finished(parent.id)
        return
    if ended != JobStatus.succeeded:
        written = int((job.result or {}).get("shards", 0))
        values: dict[str, Any] = {"shards_total": written, "cancel_requested": True}
        if ended == JobStatus.failed:
            values["error"] = error
        session.execute(update(Job).where(Job.id == parent.id).values(**values))
        queued = session.scalars(select(Job).where(
            Job.parent_id == parent.id, Job.type == JobType.shard,
            Job.status == JobStatus.queued)).all()
        session.commit()
        for shard in queued:
            if rows_changed(session, update(Job).where(
                    Job.id == shard.id, Job.status == JobStatus.queued)
                    .values(status=JobStatus.cancelled, finished_at=utcnow(),
                            cancel_requested=True)):
                session.commit()
                shard_finished(session, shard)
    done, total = session.execute(
        select(Job.shards_done, Job.shards_total).where(Job.id == parent.id)).one()
    session.commit()
    if done >= total:
        _finalize_or_leave_to_reaper(session, parent.id)


def shard_finished(session: Session, shard: Job) -> None:
    """Count a finished shard on its parent (atomic counter); the last one finalizes.

    The shard's own item counts go into its result in the same transaction, so a poll of a
    running batch counts items live only in shards still under way (see item_counts).
    """
    succeeded, failed = count_items(session, [shard.id])
    result = session.scalar(select(Job.result).where(Job.id == shard.id)) or {}
    session.execute(
        update(Job).where(Job.id == shard.id)
        .values(result={**result, "item_counts": {"succeeded": succeeded, "failed": failed}})
    )
    session.execute(
        update(Job).where(Job.id == shard.parent_id).values(shards_done=Job.shards_done + 1)
    )
    # Read back inside the same transaction: the row (PostgreSQL) or the database (SQLite)
    # stays write-locked until commit, so exactly one shard sees done == total.
    done, total = session.execute(
        select(Job.shards_done, Job.shards_total).where(Job.id == shard.parent_id)
    ).one()
    session.commit()
    if done < total:
        release_shards(session, shard.queue)  # its worker's next one, or another owner's
    else:
        _finalize_or_leave_to_reaper(session, shard.parent_id or "")


def _finalize_or_leave_to_reaper(session: Session, batch_id: str) -> None:
    """Finalize the batch now; should that fail, the reaper's finalize_stalled retries."""
    try:
        finalize_batch(session, batch_id)
    except Exception:
        session.rollback()
        log.exception("batch %s: finalizing failed; the reaper retries", batch_id)


def finalize_stalled(session: Session) -> list[str]:
    """Finalize running batches whose shards are all finished (a crash lost the last step)."""
    child = aliased(Job)
    unfinished = exists().where(child.parent_id == Job.id, child.status.not_in(list(FINISHED)))
    ids = session.scalars(
        select(Job.id).where(Job.type == JobType.batch, Job.status == JobStatus.running,
                             ~unfinished)
    ).all()
    session.commit()
    return [batch_id for batch_id in ids if finalize_batch(session, batch_id)]


def finalize_batch(session: Session, batch_id: str) -> bool:
    """Write the output and error files and complete the parent; False if not ours to do."""
    now = utcnow()
    lease = timedelta(seconds=get_settings().lease_s)
    won = rows_changed(
        session,
        update(Job)
        .where(Job.id == batch_id, Job.type == JobType.batch, Job.status == JobStatus.running,
               (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < now - lease))
        .values(worker=f"finalizer {this_worker()} pid {os.getpid()}", heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if won != 1:
        return False
    parent = session.get(Job, batch_id)
    assert parent is not None
    session.refresh(parent)
    shards = sorted(session.scalars(select(Job).where(Job.parent_id == batch_id)),
                    key=lambda s: s.spec.get("shard", 0))
    if any(JobStatus(s.status) not in FINISHED for s in shards):
        session.execute(update(Job).where(Job.id == batch_id).values(heartbeat_at=None))
        session.commit()
        return False
    storage = get_storage()
    with tempfile.TemporaryDirectory(prefix="genq-batch-") as tmp:
        out_path, err_path = Path(tmp) / "output.jsonl", Path(tmp) / "errors.jsonl"
        completed, failed = _write_lines(session, parent, shards, out_path, err_path)
        files = [_store_output(storage, parent, out_path, "batch_output", "output")]
        if failed:
            files.append(_store_output(storage, parent, err_path, "batch_error", "error"))
    status = (JobStatus.failed if parent.error  # only part of its file could be sharded
              else JobStatus.cancelled if parent.cancel_requested else JobStatus.succeeded)
    result = {**(parent.result or {}), "output_file_id": files[0].id,
              "error_file_id": files[1].id if failed else None, "completed": completed,
              "failed": failed, "total": parent.progress_total,
              "finalizing_at": int(now.timestamp())}
    session.add_all(files)
    done = rows_changed(
        session,
        update(Job)
        .where(Job.id == batch_id, Job.status == JobStatus.running)
        .values(status=status, result=result, finished_at=utcnow(), heartbeat_at=utcnow(),
                worker=None, progress_done=completed + failed)
        .execution_options(synchronize_session=False)
    )
    if done != 1:
        session.rollback()
        for f in files:
            storage.delete(storage.key_of(f.uri))
        return False
    session.commit()
    announce_finished(batch_id)
    log.info("batch %s %s: %d completed, %d failed", batch_id, status, completed, failed)
    return True


def _store_output(storage: Storage, parent: Job, path: Path, purpose: str, what: str) -> File:
    file_id = new_id("file-")
    uri, size, _ = storage.put_file(f"files/{file_id}", path)
    return File(id=file_id, owner=parent.owner, purpose=purpose,
                filename=f"{parent.id}_{what}.jsonl", bytes=size, uri=uri, created_at=utcnow())


def _items_in_line_order(session: Session, shards: list[Job]) -> Iterator[Any]:
    """Every item of the batch as a plain row, in input-line order: window by window (the
    shards written together hold a run of consecutive lines), so the database sorts one
    window's items at a time, not a million."""
    windows: dict[int, list[str]] = {}
    for shard in shards:
        windows.setdefault(int(shard.spec.get("window", 0)), []).append(shard.id)
    for window in sorted(windows):
        yield from session.execute(
            select(*OUTPUT_COLUMNS).where(Item.job_id.in_(windows[window]))
            .order_by(Item.index).execution_options(yield_per=1000)
        )


def _write_lines(
    session: Session, parent: Job, shards: list[Job], out_path: Path, err_path: Path
) -> tuple[int, int]:
    """One output line per finished item, one error line per failed or unfinished one."""
    api_url = get_settings().api_url.rstrip("/")
    storage = get_storage()

    def read_artifact(artifact_id: str) -> bytes:
        uri = session.scalar(select(Artifact.uri).where(Artifact.id == artifact_id))
        return storage.get_bytes(storage.key_of(uri)) if uri else b""

    completed = failed = 0
    by_id = {shard.id: shard for shard in shards if shard.type == JobType.shard}
    with out_path.open("wb") as out, err_path.open("wb") as errors:
        created_at: dict[Any, int] = {}  # finished_at as stored: one per committed chunk
        for item in _items_in_line_order(session, list(by_id.values())):
            line_id = "batch_req_" + hashlib.sha256(
                f"{parent.id}:{item.custom_id}".encode()).hexdigest()[:32]
            if item.status == ItemStatus.succeeded:
                completed += 1
                created = created_at.get(item.finished_at)
                if created is None:
                    created = created_at[item.finished_at] = _epoch(item.finished_at)
                body = response_body(item, line_id, api_url, created, read_artifact)
                row = {"id": line_id, "custom_id": item.custom_id,
                       "response": {"status_code": 200, "request_id": "req_" + line_id[10:],
                                    "body": body}, "error": None}
                out.write(jsonl_line(row))
                continue
            failed += 1
            error = orjson.loads(item.error_json or "null") or _unfinished_error(
                parent, by_id[item.job_id])
            row = {"id": line_id, "custom_id": item.custom_id, "response": None,
                   "error": {"code": error.get("code", "error"),
                             "message": error.get("message", "")}}
            errors.write(jsonl_line(row))
    return completed, failed


# U+2028 / U+2029 are valid raw in JSON, but str.splitlines() in a client splits there.
_LINE_SEPARATORS = (("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029"))


def jsonl_line(row: dict[str, Any]) -> bytes:
    """One JSONL line whose only line break is its last byte, for any reader's line split."""
    line = orjson.dumps(row)
    for raw, escaped in _LINE_SEPARATORS:
        if raw in line:
            line = line.replace(raw, escaped)
    return line + b"\n"


def _epoch(stored: Any) -> int:
    """Unix seconds of a UTC timestamp as the driver returns it: SQLite's text, or a datetime."""
    if stored is None:
        return int(utcnow().timestamp())
    when = datetime.fromisoformat(stored) if isinstance(stored, str) else stored
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())


def _unfinished_error(parent: Job, shard: Job) -> dict[str, Any]:
    if parent.cancel_requested or shard.status == JobStatus.cancelled:
        return {"code": "batch_cancelled",
                "message": "the batch was cancelled before this request ran"}
    e = shard.error or {}
    return {"code": e.get("code", "shard_failed"),
            "message": f"its shard {shard.id} failed: {e.get('message', '')}".strip()}


# What an output line needs of an item: no ORM objects, only two fields of its request, and
# the response and error as text (decoded by orjson, the error only for lines that have one).
OUTPUT_COLUMNS = (
    Item.job_id, Item.custom_id, Item.status, cast(Item.response, Text).label("response_json"),
    cast(Item.error, Text).label("error_json"), Item.tokens_in, Item.tokens_out,
    type_coerce(Item.finished_at, String).label("finished_at"),  # parsed once per chunk
    Item.request["url"].as_string().label("url"),
    Item.request["model"].as_string().label("model"),
    Item.request["response_format"].as_string().label("response_format"),
)


def response_body(item: Any, line_id: str, api_url: str, created: int,
                  read_artifact: Callable[[str], bytes]) -> dict[str, Any]:
    """A completion, chat.completion or images response body for a finished item row;
    `read_artifact` gives an image's PNG bytes for response_format b64_json."""
    resp = orjson.loads(item.response_json or "null") or {}
    if item.url == IMAGE_ENDPOINT:
        ids = resp.get("artifact_ids", [])
        if item.response_format == "b64_json":
            return {"created": created, "data": [
                {"b64_json": base64.b64encode(read_artifact(a)).decode()} for a in ids]}
        return {"created": created, "data": [{"url": f"{api_url}/v1/artifacts/{a}"}
                                             for a in ids]}
    texts = resp.get("texts") or []
    reasons = resp.get("finish_reasons") or []
    usage = {"prompt_tokens": item.tokens_in, "completion_tokens": item.tokens_out,
             "total_tokens": item.tokens_in + item.tokens_out}
    chat = item.url == "/v1/chat/completions"
    choices: list[dict[str, Any]] = []
    for i, text in enumerate(texts):
        reason = reasons[i] if i < len(reasons) else "stop"
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": reason, "logprobs": None})
        else:
            choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
    return {"id": ("chatcmpl-" if chat else "cmpl-") + line_id[10:], "created": created,
            "object": "chat.completion" if chat else "text_completion",
            "model": item.model or "", "choices": choices, "usage": usage}

