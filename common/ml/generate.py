"""Batched generation from a checkpoint: dynamic batches, seeded reproducibility, OOM retry."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from common.errors import InvalidRequests
from common.gen_params import GenParams, ItemInput, unsupported_fields
from common.ml.artifacts import png_bytes
from common.ml.checkpoint import LoadedModel
from common.ml.families import AnyFamily, ImageFamily, TextFamily, TextToImageFamily, get_family
from common.ml.packing import MAX_BATCH, starts_new_batch, unit_cost, unit_rows
from common.ml.sampling import Completion, seed_torch
from common.train_spec import generation_kind

log = logging.getLogger(__name__)


class GenRequest(ItemInput):
    """One request to generate: an item's input under the caller's key, returned as is."""

    key: str


@dataclass
class GenOutput:
    key: str
    texts: list[str] | None  # text families: n completions without the prompt
    images: list[bytes] | None  # image families: n PNGs, at least 64x64
    tokens_in: int
    tokens_out: int
    finish_reasons: list[str]  # "stop" | "length"


@dataclass
class Unit:
    """Work computed once: one request, or identical seeded requests sharing their result."""

    requests: list[GenRequest]
    ids: list[int] = field(default_factory=list)  # the (possibly truncated) prompt tokens
    params: GenParams = field(default_factory=GenParams)

    @property
    def head(self) -> GenRequest:
        return self.requests[0]

    def rows(self) -> int:
        return unit_rows(self.head.n, self.params.num_beams)

    def cost(self) -> int:
        """Tokens this unit holds in a batch: rows x (prompt + new tokens)."""
        return unit_cost(self.rows(), len(self.ids), self.params.max_tokens)


def validate_requests(loaded: LoadedModel, requests: list[GenRequest]) -> dict[str, list[str]]:
    """What this model cannot serve (GenParams checked the rest), by key; {} when all is fine."""
    problems: dict[str, list[str]] = {}
    n_classes = getattr(loaded.config, "n_classes", 0)
    for r in requests:
        found = unsupported_fields(generation_kind(loaded.family), r)
        if generation_kind(loaded.family) == "image" and r.label is not None:
            if not 0 <= r.label < n_classes:
                found.append("label: the model is unconditional (trained without labels)"
                             if not n_classes else f"label: must be in [0, {n_classes - 1}]")
        if found:
            problems[r.key] = found
    return problems


def _units(loaded: LoadedModel, module: AnyFamily, requests: list[GenRequest]) -> list[Unit]:
    """Encode prompts and fold identical seeded sampling requests into one unit."""
    limit = module.context_limit(loaded.model) if isinstance(module, TextFamily) else None
    units: list[Unit] = []
    seeded: dict[tuple, Unit] = {}
    for r in requests:
        params = r.params
        ids: list[int] = []
        if isinstance(module, TextFamily):
            ids = (list(r.prompt_ids) if r.prompt_ids is not None
                   else module.encode(loaded.tokenizer, r.prompt or ""))
            if limit is not None and len(ids) + params.max_tokens > limit:
                keep = max(1, limit - params.max_tokens)
                ids = ids[-keep:]
                params = params.model_copy(
                    update={"max_tokens": min(params.max_tokens, limit - len(ids))})
                log.warning("request %s: prompt/max_tokens cut to the %d-token context",
                            r.key, limit)
        if _isolated(loaded, r):
            sig = (tuple(ids), r.prompt, r.label, params, r.seed, r.n)
            if sig in seeded:
                seeded[sig].requests.append(r)
                continue
            seeded[sig] = Unit([r], ids, params)
            units.append(seeded[sig])
        else:
            units.append(Unit([r], ids, params))
    return units


def _isolated(loaded: LoadedModel, r: GenRequest) -> bool:
    """Seeded random requests run alone, so their output never depends on batch neighbours."""
    return r.seed is not None and (loaded.kind == "image" or r.isolated_sampling)


def _batches(loaded: LoadedModel, units: list[Unit], token_budget: int,
             max_batch: int) -> Iterator[list[Unit]]:
    """Isolated units one by one; the rest grouped by params, sorted by length, packed."""
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        if _isolated(loaded, u.head):
            yield [u]
        else:
            groups.setdefault((u.params.batch_key(), u.head.n), []).append(u)  # params: as cut
    for group in groups.values():
        group.sort(key=lambda u: len(u.ids))
        batch: list[Unit] = []
        cost = rows = 0
        for u in group:
            u_cost, u_rows = u.cost(), u.rows()
            if starts_new_batch(cost, rows, u_cost, u_rows, token_budget=token_budget,
                                max_batch=max_batch):
                yield batch
                batch, cost, rows = [], 0, 0
            batch.append(u)
            cost, rows = cost + u_cost, rows + u_rows
        if batch:
            yield batch


def _compute(loaded: LoadedModel, module: AnyFamily, batch: list[Unit]) -> list[GenOutput]:
    """Run one batch; isolated units under their own seed."""
    head = batch[0].head
    if _isolated(loaded, head) and head.seed is not None:
        devices = [torch.device(loaded.device).index or 0] if "cuda" in loaded.device else []
        with torch.random.fork_rng(devices=devices):
            seed_torch(head.seed, loaded.device)
            return _forward(loaded, module, batch)
    return _forward(loaded, module, batch)


def _forward(loaded: LoadedModel, module: AnyFamily, batch: list[Unit]) -> list[GenOutput]:
    outputs = []
    if isinstance(module, TextToImageFamily):
        prompts = [u.head.prompt or "" for u in batch for _ in range(u.head.n)]
        return _image_outputs(batch, module.images_for(
            loaded.model, loaded.tokenizer, loaded.config, prompts, batch[0].params))
    if isinstance(module, ImageFamily):
        n_classes = getattr(loaded.config, "n_classes", 0)
        labels = None
        if n_classes:
            labels = torch.cat([
                torch.full((u.head.n,), u.head.label) if u.head.label is not None
                else torch.randint(0, n_classes, (u.head.n,)) for u in batch])
        return _image_outputs(batch, module.sample_images(
            loaded.model, sum(u.head.n for u in batch), labels))
    results: list[list[Completion]] = module.complete(
        loaded.model, loaded.tokenizer, [u.ids for u in batch], batch[0].params, batch[0].head.n)
    for u, completions in zip(batch, results, strict=True):
        outputs += [GenOutput(r.key, [c.text for c in completions], None, len(u.ids),
                              sum(c.tokens_out for c in completions),
                              [c.finish_reason for c in completions]) for r in u.requests]
    return outputs


def _image_outputs(batch: list[Unit], images: torch.Tensor) -> list[GenOutput]:
    """Each unit's n images as PNGs of the size it asked for."""
    outputs, start = [], 0
    for u in batch:
        pngs = [png_bytes(img, size=u.params.size) for img in images[start:start + u.head.n]]
        start += u.head.n
        outputs += [GenOutput(r.key, None, list(pngs), 0, 0, ["stop"] * r.n) for r in u.requests]
    return outputs


def _with_oom_retry(loaded: LoadedModel, module: AnyFamily,
                    batch: list[Unit]) -> list[GenOutput]:
    """On CUDA out-of-memory, halve the batch and retry each half (down to one unit)."""
    try:
        return _compute(loaded, module, batch)
    except torch.cuda.OutOfMemoryError:
        if len(batch) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning("CUDA out of memory with %d requests; retrying as %d + %d",
                    len(batch), half, len(batch) - half)
        return (_with_oom_retry(loaded, module, batch[:half])
                + _with_oom_retry(loaded, module, batch[half:]))


def generate(loaded: LoadedModel, requests: list[GenRequest], *, token_budget: int = 4096,
             max_batch: int = MAX_BATCH, should_stop: Callable[[], bool] = lambda: False,
             on_outputs: Callable[[list[GenOutput]], None]) -> None:
    """Generate for every request, reporting each finished batch; stop early if asked."""
    problems = validate_requests(loaded, requests)
    if problems:
        raise InvalidRequests(problems)
    module = get_family(loaded.family)
    loaded.model.eval()
    units = _units(loaded, module, requests)
    with torch.inference_mode():
        for batch in _batches(loaded, units, token_budget, max_batch):
            if should_stop():
                log.info("generation stopped early")
                return
            on_outputs(_with_oom_retry(loaded, module, batch))
