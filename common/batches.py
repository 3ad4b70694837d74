"""Batches: a parent job split into shard jobs; the last shard to finish completes the parent."""

from __future__ import annotations

import logging

from sqlalchemy import update
from sqlalchemy.orm import Session

from common.models import Job

log = logging.getLogger(__name__)


def shard_finished(session: Session, shard: Job) -> None:
    """Count a finished shard on its parent (atomic counter); the last one finalizes."""
    session.execute(
        update(Job).where(Job.id == shard.parent_id).values(shards_done=Job.shards_done + 1)
    )
    session.commit()
