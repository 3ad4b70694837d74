"""Generation jobs and batch shards: pending items through common.ml.generate, chunk by chunk."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from pydantic import ValidationError

from common import results
from common.errors import InvalidRequests, pydantic_problems, raise_if_stopped
from common.ml.generate import GenOutput, GenRequest, generate
from common.models import ItemStatus
from common.results import PendingItem
from worker.context import JobContext
from worker.device import current_device
from worker.model_cache import get_model


class ItemWriter:
    """Finished items, committed every `item_chunk` items or FLUSH_S seconds (per-item resume)."""

    FLUSH_S = 1.0

    def __init__(self, ctx: JobContext, items: list[PendingItem], *, total: int):
        self.ctx, self.total = ctx, total
        self.by_key = {str(item.id): item for item in items}
        self.done = total - len(items)
        self.rows: list[dict[str, Any]] = []
        self.chunk = max(1, ctx.settings.item_chunk)
        self.started = self.flushed = time.monotonic()
        self.produced = self.tokens_out = 0

    def add(self, outputs: list[GenOutput]) -> None:
        self.rows += [item_row(self.ctx, self.by_key[o.key], o) for o in outputs]
        self.produced += len(outputs)
        self.tokens_out += sum(o.tokens_out for o in outputs)
        if len(self.rows) >= self.chunk or time.monotonic() - self.flushed >= self.FLUSH_S:
            self.flush()

    def add_failed(self, item_id: int, error: dict[str, Any]) -> None:
        self.rows.append({"id": item_id, "status": ItemStatus.failed, "error": error})

    def flush(self, *, commit: bool = True) -> None:
        if self.rows:
            results.write_items(self.ctx.session, self.rows, commit=commit)
            self.done += len(self.rows)
            self.rows = []
        self.flushed = time.monotonic()
        rate = self.produced / max(self.flushed - self.started, 1e-6)
        self.ctx.progress(self.done, self.total,
                          {"items_per_s": rate, "tokens_out": self.tokens_out})


def execute_items(ctx: JobContext) -> dict[str, Any]:
    """Generate every pending item of the job; finished items are kept across restarts."""
    job = ctx.job
    items = results.pending_items(ctx.session, job_id=job.id)
    total = job.progress_total
    writer = ItemWriter(ctx, items, total=total)
    groups: dict[str, list[PendingItem]] = defaultdict(list)
    for item in items:
        groups[item.model_id or job.model_id or ""].append(item)
    ctx.release_connection()  # a model may load, a batch run, before the first write

    for model_id, group in groups.items():
        if ctx.should_stop():
            break
        loaded = get_model(ctx.session, model_id, current_device())
        run_group(ctx, loaded, requests_of(group, writer), writer)
    # The last chunk is committed with the job's status (one transaction); the watcher stops
    # first, since a heartbeat must not wait on the write this leaves open.
    ctx.stop_heartbeat()
    writer.flush(commit=False)

    summary = {"items_done": writer.done, "items_total": total, "tokens_out": writer.tokens_out}
    raise_if_stopped(ctx.should_stop(), summary)
    return summary


def execute_prepare(ctx: JobContext) -> dict[str, Any]:
    """Validate a batch's input file, then write its shards (common/batches/create.py).

    On a helper thread: parsing and tokenizing a million lines makes millions of small
    allocations, whose freed pieces would otherwise slow every tensor this pool child
    allocates for the shards it runs next (common/ml/train.py on_helper_thread)."""
    from common.batches.create import prepare_batch
    from common.ml.train import on_helper_thread

    def stop_if_asked() -> None:
        raise_if_stopped(ctx.should_stop(), {})

    return on_helper_thread(lambda: prepare_batch(
        ctx.session, ctx.storage, ctx.job, on_progress=ctx.progress, should_stop=stop_if_asked))


def run_group(ctx: JobContext, loaded: Any, requests: list[GenRequest], writer: ItemWriter) -> None:
    """Generate in dynamic batches; a request the model rejects fails alone, not the job."""
    settings = ctx.settings

    def batched(todo: list[GenRequest]) -> None:
        generate(loaded, todo, token_budget=settings.token_budget,
                 should_stop=lambda: ctx.should_stop() is not None, on_outputs=writer.add)

    try:
        try:
            batched(requests)
        except InvalidRequests as exc:  # found before anything ran: fail those, batch the rest
            for key, problems in exc.problems.items():
                writer.add_failed(int(key), {"code": "invalid_request",
                                             "message": "; ".join(problems)})
            requests = [r for r in requests if r.key not in exc.problems]
            batched(requests)
        return
    except ValueError:
        pass  # a request the model rejects while running spoils its batch: isolate it
    writer.flush()
    done = {str(item.id) for item in results.pending_items(ctx.session, job_id=ctx.job.id)}
    ctx.release_connection()
    for request in requests:
        if request.key not in done or ctx.should_stop():
            continue
        try:
            generate(loaded, [request], token_budget=settings.token_budget, on_outputs=writer.add)
        except ValueError as exc:
            writer.add_failed(int(request.key), {"code": "invalid_request", "message": str(exc)})
    writer.flush()


def requests_of(items: list[PendingItem], writer: ItemWriter) -> list[GenRequest]:
    """The items as requests; one whose stored request no longer validates fails alone."""
    requests = []
    for item in items:
        try:
            requests.append(GenRequest.model_validate({**item.gen, "key": str(item.id)}))
        except ValidationError as exc:
            writer.add_failed(item.id, {"code": "invalid_request",
                                        "message": "; ".join(pydantic_problems(exc))})
    return requests


def item_row(ctx: JobContext, item: PendingItem, out: GenOutput) -> dict[str, Any]:
    """The finished item: texts, or PNGs stored as artifacts and named by id."""
    response: dict[str, Any] = {"finish_reasons": out.finish_reasons}
    if out.texts is not None:
        response["texts"] = out.texts
    if out.images is not None:
        arts = [
            results.add_artifact(
                ctx.session,
                ctx.storage,
                job=ctx.job,
                kind="image",
                filename=f"{item.custom_id}-{i}.png",
                data=png,
                content_type="image/png",
            )
            for i, png in enumerate(out.images)
        ]
        response["artifact_ids"] = [a.id for a in arts]
    return {
        "id": item.id,
        "status": ItemStatus.succeeded,
        "response": response,
        "tokens_in": out.tokens_in,
        "tokens_out": out.tokens_out,
    }
