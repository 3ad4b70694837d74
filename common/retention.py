"""Which of a training run's checkpoints are kept, and what their folders are called.

One rule for the worker's local folders (common/ml/train.py) and for storage
(common/results.py): the newest `keep_last`, plus the one with the lowest loss (DESIGN.md
section 6: "keep last K + best"). A checkpoint without a finite loss is never the best;
on a tie the newest is. Storage also keeps any checkpoint a model points at.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_DIRNAME = re.compile(r"step-(\d+)")


def checkpoint_dirname(step: int) -> str:
    """The folder of the checkpoint at `step`: zero-padded, so names sort as steps do."""
    return f"step-{step:08d}"


def step_of(dirname: str) -> int | None:
    """The step a checkpoint folder name stands for, None for any other name."""
    match = _DIRNAME.fullmatch(dirname)
    return int(match.group(1)) if match else None


def checkpoints_to_keep(losses: Sequence[object], keep_last: int) -> set[int]:
    """The positions to keep among a run's checkpoints, given their losses oldest first
    (anything but a finite number counts as no loss)."""
    keep = set(range(max(len(losses) - keep_last, 0), len(losses)))
    scored = [(loss, -i) for i, loss in enumerate(losses)
              if isinstance(loss, int | float) and math.isfinite(loss)]
    if scored:
        keep.add(-min(scored)[1])
    return keep
