"""Batches (OpenAI Batch API): validate an input file, split it into shard jobs, and let the
last shard to finish write the output and error files and complete the parent job.

A batch is a parent job (type `batch`, never claimed by a worker) plus shard jobs (type
`shard`, parent_id set) of about settings.shard_size items each. Shards count themselves on the
parent with one UPDATE (shards_done + 1) read back in the same transaction; whoever brings
it to shards_total finalizes. Finalizing takes a lease on the parent row (worker,
heartbeat_at), so a crash mid-way is retried by the reaper's `finalize_stalled`.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy import String, Text, cast, exists, func, select, type_coerce, update
from sqlalchemy.orm import Session, aliased

from common.batch_schemas import (
    IMAGE_ENDPOINT,
    BatchCreate,
    BatchErrors,
    BatchOut,
    ImageBody,
    LineError,
    RequestCounts,
    TextBody,
    chat_prompt,
)
from common.config import get_settings
from common.db import rows_changed
from common.errors import InvalidSpec, NotFound
from common.idempotency import create_once
from common.ml.packing import batch_starts, spans_at_batch_starts, unit_cost, unit_rows
from common.ml.prompt_ids import encode_prompts, load_prompt_tokenizer
from common.models import (
    FINISHED,
    Checkpoint,
    File,
    Item,
    Job,
    JobStatus,
    JobType,
    Model,
    new_id,
    utcnow,
)
from common.notices import announce_finished
from common.schemas import family_kind
from common.storage import Storage

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 1000


# ------------------------------------------------------------------ validation


@dataclass
class Parsed:
    """A validated input file: one item request per line, or the errors found."""

    custom_ids: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    models: dict[str, Model] = field(default_factory=dict)

    def error(self, line: int, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(LineError(code=code, message=message, param=param, line=line))


def parse_input(
    session: Session,
    lines: Iterator[bytes],
    *,
    owner: str,
    endpoint: str,
    default_model: str | None,
) -> Parsed:
    """Check every line of a batch input file; collect every problem with its line number."""
    settings = get_settings()
    parsed, seen = Parsed(), set()
    count = 0
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        count += 1
        if count > settings.max_batch_lines:
            parsed.error(n, "too_many_requests",
                         f"a batch holds at most {settings.max_batch_lines} requests")
            break
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:  # invalid UTF-8 lands here too
            parsed.error(n, "invalid_json", f"line is not valid JSON: {exc}")
            continue
        if not isinstance(row, dict):
            parsed.error(n, "invalid_json", "line must be a JSON object")
            continue
        custom_id = row.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 255:
            parsed.error(n, "missing_required_parameter",
                         "custom_id must be a non-empty string (at most 255 characters)",
                         "custom_id")
            continue
        if custom_id in seen:
            parsed.error(n, "duplicate_custom_id", f"custom_id {custom_id!r} is used twice",
                         "custom_id")
            continue
        seen.add(custom_id)
        request = _check_line(session, parsed, n, row, owner=owner, endpoint=endpoint,
                              default_model=default_model)
        if request is not None:
            parsed.custom_ids.append(custom_id)
            parsed.requests.append(request)
    if count == 0:
        parsed.error(1, "empty_file", "the input file has no requests")
    return parsed


def _check_line(
    session: Session, parsed: Parsed, n: int, row: dict[str, Any], *,
    owner: str, endpoint: str, default_model: str | None,
) -> dict[str, Any] | None:
    if row.get("method", "POST") != "POST":
        parsed.error(n, "invalid_method", "method must be POST", "method")
        return None
    if row.get("url") != endpoint:
        parsed.error(n, "mismatched_endpoint",
                     f"url {row.get('url')!r} is not the batch endpoint {endpoint!r}", "url")
        return None
    body = row.get("body")
    if not isinstance(body, dict):
        parsed.error(n, "missing_required_parameter", "body must be a JSON object", "body")
        return None
    image = endpoint == IMAGE_ENDPOINT
    try:
        spec: TextBody | ImageBody = (ImageBody if image else TextBody).model_validate(body)
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"])
            message = e["msg"].removeprefix("Value error, ")
            parsed.error(n, "invalid_value", f"body.{where}: {message}", f"body.{where}")
        return None
    name = spec.model or default_model
    if not name:
        parsed.error(n, "missing_required_parameter", "body.model is required", "body.model")
        return None
    model = _model(session, parsed, owner, name)
    if model is None:
        parsed.error(n, "model_not_found", f"no model named {name!r}", "body.model")
        return None
    wanted = "image" if image else "text"
    if family_kind(model.family) != wanted:
        parsed.error(n, "invalid_model", f"{name} is a {model.family} model; "
                     f"{endpoint} needs a {wanted} model", "body.model")
        return None
    base = {"model_id": model.id, "model": model.name, "url": endpoint, "body": body}
    if isinstance(spec, ImageBody):
        return {**base, "gen": {"label": spec.label, "n": spec.n, "seed": spec.seed}}
    prompt = _prompt(parsed, n, spec, chat=endpoint == "/v1/chat/completions")
    if prompt is None:
        return None
    max_tokens, cap = spec.max_completion_tokens or spec.max_tokens, get_settings().max_tokens_cap
    if max_tokens > cap:
        parsed.error(n, "invalid_value", f"max tokens must be <= {cap}",
                     "body.max_completion_tokens")
        return None
    gen = {"prompt": prompt, "max_tokens": max_tokens, "temperature": spec.temperature,
           "top_k": spec.top_k, "top_p": spec.top_p, "num_beams": spec.num_beams,
           "seed": spec.seed, "n": spec.n}
    return {**base, "gen": gen}


def _prompt(parsed: Parsed, n: int, spec: TextBody, *, chat: bool) -> str | None:
    if chat:
        if not spec.messages:
            parsed.error(n, "missing_required_parameter", "body.messages is required",
                         "body.messages")
            return None
        prompt = chat_prompt(spec.messages)
    else:
        if spec.prompt is None:
            parsed.error(n, "missing_required_parameter", "body.prompt is required", "body.prompt")
            return None
        prompt = spec.prompt if isinstance(spec.prompt, str) else spec.prompt[0]
    cap = get_settings().max_prompt_chars
    if len(prompt) > cap:
        parsed.error(n, "invalid_value", f"prompt is longer than {cap} characters", "body.prompt")
        return None
    return prompt


def _model(session: Session, parsed: Parsed, owner: str, name: str) -> Model | None:
    if name not in parsed.models:
        from common.jobs import find_model

        try:
            parsed.models[name] = find_model(session, owner=owner, name=name)
        except NotFound:
            return None
    return parsed.models[name]


# ------------------------------------------------------------------ create


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector. Validating a 10,000-line file allocates some
    300,000 containers (requests, their token-id lists), which set off full collections over
    everything the API process holds: 0.1-0.25 s of a 0.5 s create. What is built here is
    freed by refcounting as usual; any cycle waits for the next collection after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_collector_paused()
def create_batch(
    session: Session,
    storage: Storage,
    *,
    owner: str,
    spec: BatchCreate,
    idempotency_key: str | None = None,
) -> tuple[Job, list[Job]]:
    """Validate the input file and write the parent job, its shards and items (committed).

    A bad file gives a `failed` parent with per-line errors and no shards. Returns the
    parent and the shards still to dispatch (none when the key was seen before).
    """
    spec_json = spec.model_dump(mode="json", exclude_none=True)
    return create_once(
        session, owner=owner, key=idempotency_key, spec=spec_json,
        create=lambda: _write_batch(session, storage, owner=owner, spec=spec,
                                    spec_json=spec_json, idempotency_key=idempotency_key),
        replay=lambda existing: (existing, []),
    )


def _write_batch(session: Session, storage: Storage, *, owner: str, spec: BatchCreate,
                 spec_json: dict[str, Any], idempotency_key: str | None) -> tuple[Job, list[Job]]:
    from common.jobs import resolve_queue

    source = session.get(File, spec.input_file_id)
    if source is None or source.owner != owner:
        raise NotFound(f"no file {spec.input_file_id!r}", param="input_file_id")
    if source.purpose != "batch":
        raise InvalidSpec(f"file {source.id} has purpose {source.purpose!r}, not 'batch'",
                          param="input_file_id")
    with storage.open(storage.key_of(source.uri)) as f:
        parsed = parse_input(session, iter(f), owner=owner, endpoint=spec.endpoint,
                             default_model=spec.model)
    now = utcnow()
    parent = Job(
        id=new_id("job_"), owner=owner, type=JobType.batch, spec=spec_json,
        idempotency_key=idempotency_key, progress_unit="item", created_at=now,
        queue=resolve_queue(session, "auto"),
    )
    if parsed.errors:
        parent.status = JobStatus.failed
        parent.finished_at = now
        first_error = parsed.errors[0]
        parent.error = {"code": "invalid_input_file", "retryable": False,
                        "message": f"{len(parsed.errors)} problem(s) in the input file; first: "
                                   f"line {first_error.line}: {first_error.message}"}
        parent.result = {"errors": [e.model_dump() for e in parsed.errors]}
        session.add(parent)
        session.commit()
        return parent, []
    models = {m.id: m for m in parsed.models.values()}
    first = models[parsed.requests[0]["model_id"]]
    parent.status = JobStatus.running
    parent.started_at = now
    parent.family = first.family
    parent.model_id = first.id if len(models) == 1 else None
    parent.progress_total = len(parsed.requests)
    size = max(1, get_settings().shard_size)
    if spec.endpoint != IMAGE_ENDPOINT:
        _add_prompt_ids(session, storage, parsed.requests, models)
    # Shards of similar requests (model, then prompt length in tokens) pad least inside
    # their generation batches; each item keeps its input line as `index` for the output order.
    order = sorted(range(len(parsed.requests)), key=lambda i: _shard_key(parsed.requests[i]))
    spans = _shard_spans([parsed.requests[i] for i in order], size)
    parent.shards_total = len(spans)
    session.add(parent)
    session.flush()
    shards = []
    from common.jobs import insert_items

    for number, (begin, end) in enumerate(spans):
        lines = order[begin:end]
        requests = [parsed.requests[i] for i in lines]
        model = models[requests[0]["model_id"]]
        shard = Job(
            id=new_id("job_"), owner=owner, type=JobType.shard, parent_id=parent.id,
            family=model.family, model_id=model.id, queue=parent.queue, progress_unit="item",
            spec={"batch_id": parent.id, "shard": number, "endpoint": spec.endpoint},
            max_attempts=get_settings().max_attempts, created_at=now,
        )
        session.add(shard)
        session.flush()
        insert_items(session, shard.id, requests, [parsed.custom_ids[i] for i in lines], lines)
        shards.append(shard)
    session.commit()
    return parent, shards


def _shard_key(request: dict[str, Any]) -> tuple[str, int]:
    gen = request["gen"]
    ids = gen.get("prompt_ids")
    return request["model_id"], len(ids) if ids is not None else len(gen.get("prompt") or "")


PACKING_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "num_beams", "n")


def _shard_spans(requests: list[dict[str, Any]], size: int) -> list[tuple[int, int]]:
    """[begin, end) shards of about `size` requests, given in shard order.

    Where the worker will pack every request alike (one model, one set of generation
    parameters, token ids known, no seeded sampling, which runs alone), a shard ends where
    a generation batch ends (common/ml/packing.py), so no shard ends on a part-full batch.
    """
    def packing(request: dict[str, Any]) -> tuple:
        return (request["model_id"], *(request["gen"].get(k) for k in PACKING_KEYS))

    gens = [r["gen"] for r in requests]
    first = packing(requests[0])
    alike = all(g.get("prompt_ids") is not None and packing(r) == first
                for r, g in zip(requests, gens, strict=True))
    seeded_sampling = gens[0].get("seed") is not None and (gens[0].get("temperature") or 0) > 0
    starts: list[int] = []
    if alike and not seeded_sampling:
        rows = unit_rows(gens[0].get("n") or 1, gens[0].get("num_beams") or 1)
        costs = [(unit_cost(rows, len(g["prompt_ids"]), g["max_tokens"]), rows) for g in gens]
        starts = batch_starts(costs, token_budget=get_settings().token_budget)
    return spans_at_batch_starts(len(requests), size, starts)


def _add_prompt_ids(session: Session, storage: Storage, requests: list[dict[str, Any]],
                    models: dict[str, Model]) -> None:
    """Token ids of every prompt whose model has a fast tokenizer (common/ml/prompt_ids.py)."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for request in requests:
        by_model.setdefault(request["model_id"], []).append(request)
    for model_id, group in by_model.items():
        checkpoint = session.get(Checkpoint, models[model_id].checkpoint_id)
        tokenizer = load_prompt_tokenizer(storage, checkpoint.uri) if checkpoint else None
        if tokenizer is None:
            continue
        ids = encode_prompts(tokenizer, [r["gen"]["prompt"] for r in group])
        for request, prompt_ids in zip(group, ids, strict=True):
            request["gen"]["prompt_ids"] = prompt_ids


# ------------------------------------------------------------------ finish


def shard_finished(session: Session, shard: Job) -> None:
    """Count a finished shard on its parent (atomic counter); the last one finalizes.

    The shard's own item counts go into its result in the same transaction, so a poll of a
    running batch counts items live only in shards still under way (see item_counts).
    """
    succeeded, failed = _count_items(session, [shard.id])
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
    if done >= total:
        try:
            finalize_batch(session, shard.parent_id or "")
        except Exception:  # the reaper's finalize_stalled retries
            session.rollback()
            log.exception("batch %s: finalizing failed; the reaper retries", shard.parent_id)


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
    from common.jobs import this_worker
    from common.storage import get_storage

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
    status = JobStatus.cancelled if parent.cancel_requested else JobStatus.succeeded
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


def _write_lines(
    session: Session, parent: Job, shards: list[Job], out_path: Path, err_path: Path
) -> tuple[int, int]:
    """One output line per finished item, one error line per failed or unfinished one."""
    api_url = get_settings().api_url.rstrip("/")
    completed = failed = 0
    by_id = {shard.id: shard for shard in shards}
    with out_path.open("wb") as out, err_path.open("wb") as errors:
        items = session.execute(  # every item of the batch in input-line order, as plain rows
            select(*OUTPUT_COLUMNS).where(Item.job_id.in_(list(by_id))).order_by(Item.index)
            .execution_options(yield_per=1000)
        )
        created_at: dict[Any, int] = {}  # finished_at as stored: one per committed chunk
        for item in items:
            line_id = "batch_req_" + hashlib.sha256(
                f"{parent.id}:{item.custom_id}".encode()).hexdigest()[:32]
            if item.status == "succeeded":
                completed += 1
                created = created_at.get(item.finished_at)
                if created is None:
                    created = created_at[item.finished_at] = _epoch(item.finished_at)
                body = response_body(item, line_id, api_url, created)
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
)


def response_body(item: Any, line_id: str, api_url: str, created: int) -> dict[str, Any]:
    """A completion, chat.completion or images response body for a finished item row."""
    resp = orjson.loads(item.response_json or "null") or {}
    if item.url == IMAGE_ENDPOINT:
        urls = [f"{api_url}/v1/artifacts/{a}" for a in resp.get("artifact_ids", [])]
        return {"created": created, "data": [{"url": u} for u in urls]}
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


# ------------------------------------------------------------------ read


def item_counts(session: Session, *, batch_id: str) -> tuple[int, int]:
    """(succeeded, failed) items across the batch's shards, as they stand now.

    A finished shard holds its counts (shard_finished) and a shard never started has none
    done, so items are counted row by row only in the shards under way: a poll costs about
    the same for 1,000 lines as for 100,000.
    """
    succeeded = failed = 0
    live = []
    shards = session.execute(
        select(Job.id, Job.started_at, Job.result).where(Job.parent_id == batch_id)
    )
    for shard_id, started_at, result in shards:
        counts = (result or {}).get("item_counts")
        if counts is not None:
            succeeded, failed = succeeded + counts["succeeded"], failed + counts["failed"]
        elif started_at is not None:
            live.append(shard_id)
    live_succeeded, live_failed = _count_items(session, live) if live else (0, 0)
    return succeeded + live_succeeded, failed + live_failed


def _count_items(session: Session, job_ids: list[str]) -> tuple[int, int]:
    """(succeeded, failed) items of these jobs, counted row by row."""
    rows = session.execute(
        select(Item.status, func.count())
        .where(Item.job_id.in_(job_ids), Item.status != "pending")
        .group_by(Item.status)
    ).all()
    counts = {status: n for status, n in rows}
    return counts.get("succeeded", 0), counts.get("failed", 0)


def get_batch(session: Session, *, owner: str, batch_id: str) -> Job:
    job = session.get(Job, batch_id)
    if job is None or job.owner != owner or job.type != JobType.batch:
        raise NotFound(f"no batch {batch_id!r}", param="batch_id")
    return job


def mark_cancelling(session: Session, job: Job) -> None:
    """Remember when a cancel was asked (OpenAI's cancelling_at)."""
    if job.status == JobStatus.running and "cancelling_at" not in (job.result or {}):
        job.result = {**(job.result or {}), "cancelling_at": int(utcnow().timestamp())}
        session.commit()


def openai_status(job: Job) -> str:
    status = JobStatus(job.status)
    if status == JobStatus.succeeded:
        return "completed"
    if status in (JobStatus.failed, JobStatus.cancelled):
        return status.value
    if status == JobStatus.queued:
        return "validating"
    if job.cancel_requested:
        return "cancelling"
    return "finalizing" if job.shards_done >= job.shards_total else "in_progress"


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
        status=status,  # type: ignore[arg-type]
        output_file_id=result.get("output_file_id"),
        error_file_id=result.get("error_file_id"),
        created_at=int(job.created_at.timestamp()),
        in_progress_at=ts(job.started_at),
        expires_at=int((job.created_at + timedelta(hours=24)).timestamp()),
        finalizing_at=result.get("finalizing_at"),
        completed_at=finished if status == "completed" else None,
        failed_at=finished if status == "failed" else None,
        cancelling_at=result.get("cancelling_at"),
        cancelled_at=finished if status == "cancelled" else None,
        request_counts=RequestCounts(total=job.progress_total, completed=completed, failed=failed),
        metadata=spec.get("metadata"),
    )


def list_batches(
    session: Session, *, owner: str, after: str | None, limit: int
) -> tuple[list[Job], bool]:
    query = select(Job).where(Job.owner == owner, Job.type == JobType.batch)
    if after:
        cursor = get_batch(session, owner=owner, batch_id=after)
        query = query.where((Job.created_at < cursor.created_at)
                            | ((Job.created_at == cursor.created_at) & (Job.id < cursor.id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc())
                                .limit(limit + 1)))
    return rows[:limit], len(rows) > limit
