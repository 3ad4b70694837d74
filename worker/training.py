"""A training job inside a worker: storage and SQL around common.ml.train.run_training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common import results
from common.errors import InvalidSpec, Stopped, pydantic_problems, raise_if_stopped
from common.files import dataset_path
from common.ml.checkpoint import read_meta
from common.ml.data import validate_data
from common.ml.train import SAMPLES_FILE, TrainHooks, run_training
from common.models import Checkpoint, File
from common.retention import checkpoint_dirname
from common.schemas import TrainJobSpec
from common.train_spec import DataSpec, family_kind
from worker.context import JobContext
from worker.device import current_device, inference_dtype

LOGGED = ("loss", "eval_loss", "lr", "samples_per_s")  # what each interval's log line shows


def execute_training(ctx: JobContext) -> dict[str, Any]:
    """Train (resuming from this job's last checkpoint after a restart) and register a model."""
    job, spec = ctx.job, job_spec(ctx.job.spec)
    spec = spec.model_copy(update={"data": resolve_data(ctx, spec.data)})
    problems = validate_data(spec.data_source, family_kind(spec.family))
    if problems:
        raise InvalidSpec("; ".join(problems), param="data")
    resume = resume_point(ctx, spec)
    if resume is not None:
        ctx.log(f"resuming from checkpoint {resume.id} at step {resume.step}")
    resume_dir = (
        ctx.storage.local_dir(ctx.storage.key_of(resume.uri), ctx.cache_dir) if resume else None
    )

    last: dict[str, Checkpoint] = {}

    def on_checkpoint(step: int, local: Path, metrics: dict[str, float]) -> None:
        last["ckpt"] = results.save_checkpoint(
            ctx.session,
            ctx.storage,
            job=job,
            step=step,
            local=local,
            metrics=metrics,
            keep_last=spec.keep_last,
        )
        ctx.log(f"checkpoint {last['ckpt'].id} at step {step}")
        grid = local / SAMPLES_FILE  # text to image: the validation prompts at this step
        if grid.is_file():
            results.add_artifact(ctx.session, ctx.storage, job=job, kind="checkpoint_grid",
                                 filename=f"samples-{checkpoint_dirname(step)}.png",
                                 data=grid.read_bytes(), content_type="image/png")

    def on_metrics(step: int, values: dict[str, float]) -> None:
        ctx.write_metrics(step, values)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k in LOGGED)
        ctx.log(f"step {step}: {shown}")

    def on_base(local: Path) -> str:
        uri, size = ctx.storage.put_dir(f"checkpoints/{job.id}/base", local)
        ctx.log(f"stored the adapter's from-config base ({size} bytes)")
        return uri

    hooks = TrainHooks(
        should_stop=ctx.should_stop,
        on_progress=ctx.progress,
        on_metrics=on_metrics,
        on_checkpoint=on_checkpoint,
        on_base=on_base,
        locate=lambda uri: ctx.storage.local_dir(ctx.storage.key_of(uri), ctx.cache_dir),
    )
    device = current_device()
    # a frozen text base may be held in bf16; a UNet LoRA's pipeline stays fp32, as image
    # models do (the VAE and UNet take fp32 pixels and noise outside autocast)
    text = family_kind(spec.family) == "text"
    ctx.release_connection()  # minutes to hours without SQL until the first hook writes
    try:
        outcome = run_training(spec, ctx.workdir, hooks=hooks, resume_from=resume_dir,
                               device=device, base_dtype=inference_dtype(device) if text else None)
    except Stopped as stop:  # stopped while building: this job's last checkpoint stands
        earlier = results.latest_checkpoint(ctx.session, job_id=job.id)
        raise type(stop)({"checkpoint_id": earlier.id if earlier else None,
                          "step": earlier.step if earlier else 0}) from None
    ckpt = last.get("ckpt") or results.latest_checkpoint(ctx.session, job_id=job.id)
    partial = {"checkpoint_id": ckpt.id if ckpt else None, "step": outcome.step}
    raise_if_stopped(outcome.stopped, partial)
    pictures = [
        results.add_artifact(
            ctx.session,
            ctx.storage,
            job=job,
            kind=art.kind,
            filename=art.path.name,
            data=art.path.read_bytes(),
            content_type=art.content_type,
        )
        for art in outcome.artifacts
    ]
    assert ckpt is not None, "run_training always writes a final checkpoint"
    name = spec.name or f"{job.family}-{job.id[4:12]}"
    meta = read_meta(outcome.checkpoint)
    adapter = {"spec": meta["adapter"], "base": meta.get("base")} if "adapter" in meta else None
    if outcome.merged is not None:  # the full merged weights are the model: no adapter left
        ckpt = results.save_checkpoint(ctx.session, ctx.storage, job=job, step=outcome.step,
                                       local=outcome.merged, metrics=ckpt.metrics,
                                       keep_last=spec.keep_last, dirname=results.MERGED)
        adapter = None
    model = results.register_model(ctx.session, job=job, name=name, checkpoint=ckpt,
                                   source=meta.get("source"), adapter=adapter)
    ctx.log(f"registered model {name!r} from step {ckpt.step}")
    return {
        **partial,
        "model": model.name,
        "model_id": model.id,
        "metrics": outcome.metrics,
        "artifacts": [
            {"id": a.id, "kind": a.kind, "filename": a.filename, "url": f"/v1/artifacts/{a.id}"}
            for a in pictures
        ],
    }


def job_spec(stored: dict[str, Any]) -> TrainJobSpec:
    """The job's spec parsed with the API's own class: what was accepted is what runs."""
    try:
        return TrainJobSpec.model_validate(stored)
    except ValidationError as e:
        raise InvalidSpec("; ".join(pydantic_problems(e))) from e


def resolve_data(ctx: JobContext, data: DataSpec | None) -> DataSpec | None:
    """Turn a file id into a local path the data loader can open."""
    if data is None or data.file_id is None:
        return data
    file = ctx.session.get(File, data.file_id)
    if file is None:
        raise InvalidSpec(f"file {data.file_id!r} is gone", param="data.file_id")
    return DataSpec(path=str(dataset_path(ctx.storage, file, ctx.cache_dir)))


def resume_point(ctx: JobContext, spec: TrainJobSpec) -> Checkpoint | None:
    """This job's own last checkpoint (a restart), else the spec's resume_from."""
    own = results.latest_checkpoint(ctx.session, job_id=ctx.job.id)
    if own is not None:
        return own
    return ctx.session.get(Checkpoint, spec.resume_from) if spec.resume_from else None
