"""Checkpoint retention: one rule for the worker's local folders and for storage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from common import results
from common.models import Checkpoint, Job, Model
from common.retention import checkpoint_dirname, checkpoints_to_keep, step_of
from common.storage import Storage


@pytest.mark.parametrize(("losses", "keep_last", "kept"), [
    ([], 2, set()),
    ([3.0], 2, {0}),
    ([3.0, 2.0, 1.0, 0.5], 2, {2, 3}),  # the best is among the newest: nothing more
    ([3.0, 0.1, 1.0, 0.5], 2, {1, 2, 3}),  # plus the best
    ([0.1, 0.1, 1.0, 1.0], 1, {1, 3}),  # a tie: the newer of the two
    ([None, "x", math.nan, math.inf, 9.0], 1, {4}),  # only finite losses compete
    ([None, None, None], 2, {1, 2}),
])
def test_which_checkpoints_are_kept(losses: list[object], keep_last: int, kept: set[int]) -> None:
    assert checkpoints_to_keep(losses, keep_last) == kept


def test_folder_names_sort_as_steps_and_read_back() -> None:
    names = [checkpoint_dirname(s) for s in (9, 10, 12_345_678)]
    assert names == sorted(names) == ["step-00000009", "step-00000010", "step-12345678"]
    assert [step_of(n) for n in names] == [9, 10, 12_345_678]
    assert step_of("step-000010") == 10  # an older, narrower name still counts
    assert step_of(".step-00000010.tmp-1a2b3c4d") is None and step_of("step-") is None


def write_local(directory: Path, losses: dict[int, float]) -> None:
    for step, loss in losses.items():
        folder = directory / checkpoint_dirname(step)
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"step": step, "loss": loss}))


def test_local_and_storage_keep_the_same_steps(session: Session, tmp_path: Path) -> None:
    from common.ml.train import _prune

    losses = {2: 3.0, 4: 0.2, 6: 1.0, 8: 0.9, 10: 0.8}
    local = tmp_path / "checkpoints"
    write_local(local, losses)
    (local / ".step-00000012.tmp-1a2b3c4d").mkdir()  # a save in progress is not touched
    _prune(local, keep_last=2)
    assert sorted(p.name for p in local.iterdir()) == [
        ".step-00000012.tmp-1a2b3c4d", *(checkpoint_dirname(s) for s in (4, 8, 10))]

    storage = Storage(f"file://{tmp_path / 'objects'}")
    job = Job(id="job_keep", owner="ann", type="train", family="vae", spec={})
    session.add(job)
    session.commit()
    saved = {}
    for step, loss in losses.items():
        folder = tmp_path / "src" / checkpoint_dirname(step)
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text("{}")
        saved[step] = results.save_checkpoint(session, storage, job=job, step=step,
                                              local=folder, metrics={"loss": loss}, keep_last=2)
        if step == 2:  # a model points at the first: it stays whatever its loss
            session.add(Model(id="model_keep", owner="ann", name="m", family="vae",
                              checkpoint_id=saved[2].id, created_by_job=job.id))
            session.commit()
    kept = session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job.id)
                           .order_by(Checkpoint.step))
    assert list(kept) == [2, 4, 8, 10]
    assert storage.key_of(saved[10].uri) == f"checkpoints/job_keep/{checkpoint_dirname(10)}"
    assert not storage.exists(f"checkpoints/job_keep/{checkpoint_dirname(6)}/metrics.json")
    assert storage.exists(f"checkpoints/job_keep/{checkpoint_dirname(4)}/metrics.json")
