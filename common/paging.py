"""Keyset paging: the rows after a cursor, one page at a time, and whether more follow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

Row = TypeVar("Row")


@dataclass(frozen=True)
class Page(Generic[Row]):
    rows: list[Row]
    has_more: bool
    next_cursor: Any = None  # the last row's last order value when has_more, else None


def keyset_page(
    session: Session,
    query: Select[Row],
    order: Sequence[InstrumentedAttribute[Any]],
    *,
    after: Sequence[Any] | None,
    limit: int,
    newest_first: bool = False,
) -> Page[Row]:
    """Up to `limit` rows of `query` sorted by `order` (whose last column is unique), starting
    past the row whose `order` values are `after` (None: from the start)."""
    if after is not None:
        query = query.where(_past(order, after, newest_first))
    sort = [column.desc() if newest_first else column.asc() for column in order]
    rows = list(session.scalars(query.order_by(*sort).limit(limit + 1)))
    if len(rows) <= limit:
        return Page(rows, has_more=False)
    page = rows[:limit]
    return Page(page, has_more=True, next_cursor=getattr(page[-1], order[-1].key))


def _past(order: Sequence[InstrumentedAttribute[Any]], after: Sequence[Any],
          newest_first: bool) -> ColumnElement[bool]:
    """Rows sorting after `after`: past it on the first column, or level with it there and
    past it on the next, and so on (row-value comparison, spelled out for every database)."""
    terms = []
    for i, (column, value) in enumerate(zip(order, after, strict=True)):
        level = [c == v for c, v in zip(order[:i], after[:i], strict=True)]
        terms.append(and_(*level, column < value if newest_first else column > value))
    return or_(*terms)
