"""How generation requests pack into dynamic batches, without torch.

One rule for the worker's `generate()` and for the API, which cuts a batch's shards where
a generation batch ends: ten shards of 1,000 lines would each end on a part-full batch of
40 rows that costs nearly as much as a full one of 64.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

MAX_BATCH = 64  # rows (requests x n x beams) in one generation batch


def unit_rows(n: int, num_beams: int) -> int:
    """Rows a request takes in a batch."""
    return n * max(1, num_beams)


def unit_cost(rows: int, prompt_tokens: int, max_tokens: int) -> int:
    """Tokens a request holds in a batch: rows x (prompt + new tokens)."""
    return rows * (prompt_tokens + max_tokens)


def starts_new_batch(cost: int, rows: int, add_cost: int, add_rows: int, *,
                     token_budget: int, max_batch: int) -> bool:
    """Whether a unit must open a new batch after one holding `cost` tokens in `rows` rows."""
    return rows > 0 and (cost + add_cost > token_budget or rows + add_rows > max_batch)


def batch_starts(units: list[tuple[int, int]], *, token_budget: int,
                 max_batch: int = MAX_BATCH) -> list[int]:
    """Indexes where each batch starts, for (cost, rows) units packed in this order."""
    starts: list[int] = []
    cost = rows = 0
    for i, (u_cost, u_rows) in enumerate(units):
        if not starts or starts_new_batch(cost, rows, u_cost, u_rows,
                                          token_budget=token_budget, max_batch=max_batch):
            starts.append(i)
            cost = rows = 0
        cost, rows = cost + u_cost, rows + u_rows
    return starts


def spans_at_batch_starts(n: int, size: int, starts: list[int]) -> list[tuple[int, int]]:
    """[begin, end) spans of about `size` of n items, each ending at the batch start nearest
    its size within half a size either way; where there is none, at the size itself."""
    spans: list[tuple[int, int]] = []
    begin = 0
    while n - begin > size:
        target = begin + size
        near = starts[bisect_left(starts, begin + (size + 1) // 2):
                      bisect_right(starts, begin + size + size // 2)]
        end = min(near, key=lambda s: abs(s - target), default=target)
        spans.append((begin, end))
        begin = end
    spans.append((begin, n))
    return spans
