"""The shared SQL lookups: keyset paging (common/paging.py) and owned rows (common/owned.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from common.errors import NotFound
from common.models import Artifact, Checkpoint, Item, Job, Model
from common.owned import get_owned
from common.paging import keyset_page

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def add_jobs(session: Session, owner: str, created: list[datetime]) -> list[Job]:
    jobs = [Job(id=f"job_{owner}_{i:02d}", owner=owner, type="train", spec={}, created_at=at)
            for i, at in enumerate(created)]
    session.add_all(jobs)
    session.commit()
    return jobs


def test_newest_first_pages_cover_every_row_once(session: Session) -> None:
    # Ties on created_at (three jobs in one instant) are broken by id, so no row is skipped.
    created = [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=1),
               T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]
    jobs = add_jobs(session, "ann", created)
    add_jobs(session, "bob", [T0 + timedelta(seconds=5)])
    query = select(Job).where(Job.owner == "ann")
    order = (Job.created_at, Job.id)
    seen, pages, start = [], [], None
    while True:
        page = keyset_page(session, query, order, after=start, limit=2, newest_first=True)
        pages.append(page)
        seen += [j.id for j in page.rows]
        if not page.has_more:
            break
        cursor = session.get(Job, page.next_cursor)
        assert cursor is not None
        start = (cursor.created_at, cursor.id)
    newest_first = sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)
    assert seen == [j.id for j in newest_first]
    assert [len(p.rows) for p in pages] == [2, 2, 1]
    assert [p.has_more for p in pages] == [True, True, False]
    assert pages[0].next_cursor == pages[0].rows[-1].id and pages[-1].next_cursor is None


def test_ascending_pages_on_one_column(session: Session) -> None:
    (job,) = add_jobs(session, "ann", [T0])
    session.add_all([Item(job_id=job.id, index=i, custom_id=str(i), status="pending", request={})
                     for i in range(5)])
    session.commit()
    query = select(Item).where(Item.job_id == job.id)
    first = keyset_page(session, query, (Item.index,), after=None, limit=3)
    assert [i.index for i in first.rows] == [0, 1, 2]
    assert first.has_more and first.next_cursor == 2
    rest = keyset_page(session, query, (Item.index,), after=(first.next_cursor,), limit=3)
    assert [i.index for i in rest.rows] == [3, 4]
    assert not rest.has_more and rest.next_cursor is None
    exact = keyset_page(session, query, (Item.index,), after=(1,), limit=3)
    assert [i.index for i in exact.rows] == [2, 3, 4] and not exact.has_more


def test_owned_rows_are_found_only_by_their_owner(session: Session) -> None:
    (job,) = add_jobs(session, "ann", [T0])
    ckpt = Checkpoint(id="ckpt_1", job_id=job.id, step=2, uri="file:///x")
    art = Artifact(id="art_1", job_id=job.id, kind="plot", filename="loss.png", uri="file:///y",
                   bytes=1, sha256="0" * 64, content_type="image/png")
    session.add_all([ckpt, art])
    session.commit()
    session.add(Model(id="model_1", owner="ann", name="tiny", family="lstm",
                      checkpoint_id=ckpt.id))
    session.commit()

    assert get_owned(session, Job, job.id, owner="ann", what="job", param="job_id") is job
    assert get_owned(session, Job, job.id, owner=None, what="job", param="job_id") is job
    assert get_owned(session, Checkpoint, "ckpt_1", owner="ann", what="checkpoint",
                     param="checkpoint_id") is ckpt
    assert get_owned(session, Artifact, "art_1", owner="ann", what="artifact",
                     param="artifact_id") is art
    for key in ("tiny", "model_1"):
        found = get_owned(session, Model, key, owner="ann", by=[Model.name, Model.id],
                          what="model named", param="model")
        assert found.id == "model_1"

    batch = [Job.type == "batch"]  # how common/batches finds a batch: a job of that type
    with pytest.raises(NotFound, match="no batch 'job_ann_00'"):
        get_owned(session, Job, job.id, owner="ann", where=batch, what="batch", param="batch_id")
    assert get_owned(session, Job, job.id, owner="ann", where=[Job.type == "train"], what="job",
                     param="job_id") is job

    cases = [(Job, job.id, "job", "job_id"), (Checkpoint, "ckpt_1", "checkpoint", "checkpoint_id"),
             (Artifact, "art_1", "artifact", "artifact_id"), (Job, "job_nope", "job", "job_id")]
    for entity, key, what, param in cases:
        with pytest.raises(NotFound) as exc:
            get_owned(session, entity, key, owner="bob", what=what, param=param)
        assert exc.value.message == f"no {what} {key!r}" and exc.value.param == param
        assert exc.value.code == "not_found"
    with pytest.raises(NotFound) as exc:
        get_owned(session, Model, "tiny", owner="bob", by=[Model.name, Model.id],
                  what="model named", param="model", code="model_not_found")
    assert exc.value.message == "no model named 'tiny'" and exc.value.code == "model_not_found"
