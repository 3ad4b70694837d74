"""Creating a batch: the parent job, then (on a worker) its shards, similar requests together,
and their items, written a window at a time as the input file is read."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from common.batches.input_file import Checked, Checker, Validated, requests_in, validate_file
from common.batches.schemas import IMAGE_ENDPOINT, BatchCreate
from common.config import get_settings
from common.db import rows_changed
from common.dispatch import release_shards
from common.errors import Cancelled, InvalidSpec, LeaseLost
from common.files import get_file
from common.fleet import resolve_queue
from common.gen_params import ItemInput, packing_key
from common.idempotency import create_once
from common.ml.packing import batch_starts, spans_at_batch_starts, unit_cost, unit_rows
from common.ml.prompt_ids import encode_prompts, load_prompt_tokenizer
from common.models import Checkpoint, File, Job, JobStatus, JobType, Model, new_id, utcnow
from common.notices import announce_finished
from common.results import insert_items
from common.storage import Storage


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector. Validating a 10,000-line file allocates some
    300,000 containers (requests, their token-id lists), which set off full collections over
    everything the process holds (measured when the API did this: 0.1-0.25 s of a 0.5 s
    create). What is built here is freed by refcounting as usual; any cycle waits for the
    next collection after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def create_batch(
    session: Session,
    *,
    owner: str,
    spec: BatchCreate,
    idempotency_key: str | None = None,
) -> tuple[Job, Job | None]:
    """Write the parent job (`validating`) and the job that prepares it (committed).

    The file is read by that job on a worker (prepare_batch), not here: a million-line file
    takes a minute to check and tokenize, and the answer is due in a moment. Returns the
    parent and the preparing job to dispatch (None when the key was seen before).
    """
    spec_json = spec.model_dump(mode="json", exclude_none=True)
    return create_once(
        session, owner=owner, key=idempotency_key, spec=spec_json,
        create=lambda: _write_batch(session, owner=owner, spec=spec, spec_json=spec_json,
                                    idempotency_key=idempotency_key),
        replay=lambda existing: (existing, None),
    )


def _write_batch(session: Session, *, owner: str, spec: BatchCreate, spec_json: dict[str, Any],
                 idempotency_key: str | None) -> tuple[Job, Job]:
    source = get_file(session, owner=owner, file_id=spec.input_file_id, param="input_file_id")
    if source.purpose != "batch":
        raise InvalidSpec(f"file {source.id} has purpose {source.purpose!r}, not 'batch'",
                          param="input_file_id")
    now = utcnow()
    parent = Job(
        id=new_id("job_"), owner=owner, type=JobType.batch, spec=spec_json,
        idempotency_key=idempotency_key, progress_unit="item", created_at=now,
        queue=resolve_queue(session, "auto"), status=JobStatus.queued,
    )
    session.add(parent)
    session.flush()
    prepare = Job(
        id=new_id("job_"), owner=owner, type=JobType.prepare, parent_id=parent.id,
        queue=parent.queue, progress_unit="line", created_at=now,
        # the cap in force when the batch was accepted is the one its file is held to
        spec={"batch_id": parent.id, "input_file_id": source.id,
              "max_lines": get_settings().max_batch_lines},
        max_attempts=get_settings().max_attempts,
    )
    session.add(prepare)
    session.commit()
    return parent, prepare


@dataclass
class Preparing:
    """A batch being prepared by its `prepare` job: what the file's lines have become so far.

    `lines_done`, `requests_done` and `shards` are committed with each window's items, so a
    later attempt of the job goes on after the last window written.
    """

    session: Session
    storage: Storage
    parent: Job
    job: Job
    checker: Checker
    lines_done: int = 0
    requests_done: int = 0
    shards: int = 0

    def lines(self) -> Iterator[bytes]:
        source = self.session.get(File, self.parent.spec["input_file_id"])
        if source is None:
            raise InvalidSpec("the batch's input file was deleted", param="input_file_id")
        with self.storage.open(self.storage.key_of(source.uri)) as f:
            yield from f


@_collector_paused()
def prepare_batch(session: Session, storage: Storage, job: Job, *,
                  on_progress: Callable[[int, int], None],
                  should_stop: Callable[[], None]) -> dict[str, Any]:
    """The `prepare` job's body: validate the whole file, then shard it window by window.

    A file with any bad line fails the parent with every line's errors and writes nothing
    else. A valid one turns the parent `in_progress`; one of a single window is written
    from what the check kept, a longer one is read again, a window of SHARDS_PER_WINDOW
    shards at a time: each window's requests are tokenized, sorted,
    cut into shards and written with their items in one transaction, and its shards are
    released at once, so the first shards run while the rest of the file is still being
    sharded. Memory holds one window, whatever the file's length.
    """
    parent = session.get(Job, job.parent_id)
    assert parent is not None
    spec = parent.spec
    size = max(1, get_settings().shard_size) * SHARDS_PER_WINDOW
    state = Preparing(session, storage, parent, job, Checker(
        session, owner=parent.owner, endpoint=spec["endpoint"], default_model=spec.get("model")),
        **{k: v for k, v in (job.result or {}).items() if k in PREPARED_KEYS})
    if parent.status == JobStatus.queued:

        def validating(lines: int) -> None:
            should_stop()
            on_progress(lines, 0)

        validated = validate_file(state.checker, state.lines, cap=job.spec["max_lines"],
                                  on_progress=validating, keep=size)
        if validated.errors:
            _fail_invalid(session, parent, validated)
            return {"requests": validated.requests, "errors": validated.error_count}
        _start(session, parent, validated, state.checker)
        if validated.whole is not None:  # one window, checked already: no second read
            return _last_window(state, validated.whole, lines_done=validated.last_line,
                                on_progress=on_progress)
    window: list[Checked] = []
    line = state.lines_done
    for line, raw in requests_in(state.lines()):
        if line <= state.lines_done:
            continue
        checked = state.checker.check(line, raw)
        if checked is None:  # valid when checked: a model it names was deleted since
            raise InvalidSpec(f"line {line}: {state.checker.errors[-1].message}",
                              param="input_file_id")
        window.append(checked)
        if len(window) >= size:
            _write_window(state, window, lines_done=line, last=False)
            window = []
            on_progress(state.requests_done, parent.progress_total)
            should_stop()
    return _last_window(state, window, lines_done=max(line, state.lines_done),
                        on_progress=on_progress)


def _last_window(state: Preparing, window: list[Checked], *, lines_done: int,
                 on_progress: Callable[[int, int], None]) -> dict[str, Any]:
    """Write the file's last window (perhaps empty): the parent then knows its shards."""
    _write_window(state, window, lines_done=lines_done, last=True)
    on_progress(state.requests_done, state.parent.progress_total)
    return {"requests": state.requests_done, "shards": state.shards,
            "lines_done": state.lines_done, "requests_done": state.requests_done}


PREPARED_KEYS = ("lines_done", "requests_done", "shards")
SHARDS_PER_WINDOW = 16


def _fail_invalid(session: Session, parent: Job, validated: Validated) -> None:
    """A bad file: the parent fails with its per-line errors, no shard is written."""
    first = validated.errors[0]
    parent.status = JobStatus.failed
    parent.finished_at = utcnow()
    parent.error = {"code": "invalid_input_file", "retryable": False,
                    "message": f"{validated.error_count} problem(s) in the input file; "
                               f"first: line {first.line}: {first.message}"}
    parent.result = {"errors": [e.model_dump() for e in validated.errors]}
    session.commit()
    announce_finished(parent.id)


def _start(session: Session, parent: Job, validated: Validated, checker: Checker) -> None:
    """A valid file: the parent is in progress, with one shard to come at least."""
    first = validated.first_model
    assert first is not None
    parent.status = JobStatus.running
    parent.started_at = utcnow()
    parent.family = first.family
    parent.model_id = first.id if len({m.id for m in checker.models.values()}) == 1 else None
    parent.progress_total = validated.requests
    parent.shards_total = 1  # shards written + 1 until the last window: nothing finalizes
    session.commit()


def _write_window(state: Preparing, window: list[Checked], *,
                  lines_done: int, last: bool) -> None:
    """Shard one window of requests and write it, with the job's place in the file."""
    session, parent = state.session, state.parent
    requests = [request for _, request in window]
    models = {m.id: m for m in state.checker.models.values()}
    if requests and parent.spec["endpoint"] != IMAGE_ENDPOINT:
        _add_prompt_ids(session, state.storage, requests, models)
    # Shards of similar requests (model, then prompt length in tokens) pad least inside
    # their generation batches; each item keeps its input line as `index` for the output order.
    order = sorted(range(len(requests)), key=lambda i: _shard_key(requests[i]))
    size = max(1, get_settings().shard_size)  # the last window may be empty: no shard
    spans = _shard_spans([requests[i] for i in order], size) if requests else []
    now = utcnow()
    first_shard = state.shards  # names the window: its items are the lines it read
    for begin, end in spans:
        lines = order[begin:end]
        model = models[requests[lines[0]]["model_id"]]
        shard = Job(
            id=new_id("job_"), owner=parent.owner, type=JobType.shard, parent_id=parent.id,
            family=model.family, model_id=model.id, queue=parent.queue, progress_unit="item",
            created_at=now, spec={"batch_id": parent.id, "shard": state.shards,
                                  "window": first_shard, "endpoint": parent.spec["endpoint"]},
            max_attempts=get_settings().max_attempts,
        )
        session.add(shard)
        session.flush()
        insert_items(session, shard.id, [requests[i] for i in lines],
                     [window[i][0] for i in lines], [state.requests_done + i for i in lines])
        state.shards += 1
    state.requests_done += len(requests)
    state.lines_done = lines_done
    # A conditional write under the lock this transaction then holds (the parent's row on
    # PostgreSQL, the whole database on SQLite): cancel_job flags the parent before it reads
    # the shards to cancel, so a window either commits first, and its shards are cancelled
    # with the others, or finds the flag here and writes nothing. Released unflagged, they
    # would run and their items land in a cancelled batch's output.
    live = rows_changed(session, update(Job).where(
        Job.id == parent.id, Job.cancel_requested.is_(False))
        .values(shards_total=state.shards + (0 if last else 1)))
    if live != 1:  # the prepare job ends cancelled at the windows before this one
        session.rollback()
        raise Cancelled({})
    result = {**(state.job.result or {}), **{k: getattr(state, k) for k in PREPARED_KEYS}}
    ours = rows_changed(session, update(Job).where(
        Job.id == state.job.id, Job.attempt == state.job.attempt,
        Job.status == JobStatus.running).values(result=result)
        .execution_options(synchronize_session=False))
    if ours != 1:  # the reaper gave the job to another attempt: write nothing
        session.rollback()
        raise LeaseLost({})
    session.commit()
    # what a stop's transition merges its partial result into (jobs.finish_job)
    set_committed_value(state.job, "result", result)
    if spans:
        release_shards(session, parent.queue)


def _shard_key(request: dict[str, Any]) -> tuple[str, int]:
    gen = request["gen"]
    ids = gen.get("prompt_ids")
    return request["model_id"], len(ids) if ids is not None else len(gen.get("prompt") or "")


def _shard_spans(requests: list[dict[str, Any]], size: int) -> list[tuple[int, int]]:
    """[begin, end) shards of about `size` requests, given in shard order.

    Where the worker will pack every request alike (one model, one set of generation
    parameters, token ids known, no seeded sampling, which runs alone), a shard ends where
    a generation batch ends (common/ml/packing.py), so no shard ends on a part-full batch.
    """
    gens = [r["gen"] for r in requests]  # ItemInput dumps, validated by the Checker
    first = (requests[0]["model_id"], packing_key(gens[0]))
    alike = all(g.get("prompt_ids") is not None and (r["model_id"], packing_key(g)) == first
                for r, g in zip(requests, gens, strict=True))
    starts: list[int] = []
    if alike and not ItemInput.model_construct(**gens[0]).isolated_sampling:
        rows = unit_rows(gens[0]["n"], gens[0]["num_beams"])
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

