"""Creating a batch: the parent job, its shards (similar requests together) and their items."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session

from common.batches.input_file import parse_input
from common.batches.schemas import IMAGE_ENDPOINT, BatchCreate
from common.config import get_settings
from common.errors import InvalidSpec
from common.files import get_file
from common.fleet import resolve_queue
from common.gen_params import ItemInput
from common.idempotency import create_once
from common.ml.packing import batch_starts, spans_at_batch_starts, unit_cost, unit_rows
from common.ml.prompt_ids import encode_prompts, load_prompt_tokenizer
from common.models import Checkpoint, Job, JobStatus, JobType, Model, new_id, utcnow
from common.results import insert_items
from common.storage import Storage


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
    source = get_file(session, owner=owner, file_id=spec.input_file_id, param="input_file_id")
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


def _shard_spans(requests: list[dict[str, Any]], size: int) -> list[tuple[int, int]]:
    """[begin, end) shards of about `size` requests, given in shard order.

    Where the worker will pack every request alike (one model, one set of generation
    parameters, token ids known, no seeded sampling, which runs alone), a shard ends where
    a generation batch ends (common/ml/packing.py), so no shard ends on a part-full batch.
    """
    gens = [ItemInput.model_construct(**r["gen"]) for r in requests]  # validated: parse_input
    first = (requests[0]["model_id"], gens[0].packing_key())
    alike = all(g.prompt_ids is not None and (r["model_id"], g.packing_key()) == first
                for r, g in zip(requests, gens, strict=True))
    starts: list[int] = []
    if alike and not gens[0].isolated_sampling:
        rows = unit_rows(gens[0].n, gens[0].num_beams)
        costs = [(unit_cost(rows, len(g.prompt_ids or ()), g.max_tokens), rows) for g in gens]
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

