"""Engine and session factory: SQLite (WAL, busy timeout) by default, PostgreSQL via psycopg 3."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import orjson
from sqlalchemy import CursorResult, Engine, Executable, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from common.config import get_settings


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain postgresql:// URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """JSON columns hold standard JSON: a NaN or infinite metric is stored as null
    (PostgreSQL rejects NaN; SQLite would keep a value no JSON reader accepts).

    orjson writes NaN as null itself and is ~6x faster than json (a 10,000-line batch
    stores 10,000 item requests); what it refuses (integers past 64 bits, lone
    surrogates) goes through json as before."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One pooled engine per URL and process."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            json_serializer=json_dumps,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    settings = get_settings()
    return create_engine(
        url,
        json_serializer=json_dumps,
        pool_pre_ping=True,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )


def get_engine() -> Engine:
    """The engine of the configured database."""
    return engine_for(get_settings().db_url)


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    """The sessionmaker of `engine` (the configured database's by default)."""
    return _sessionmaker(engine or get_engine())


@lru_cache(maxsize=8)
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # one per engine: building a sessionmaker costs more than the session it makes (every
    # API request opens one)
    return sessionmaker(bind=engine, expire_on_commit=False)


def rows_changed(session: Session, statement: Executable) -> int:
    """Run an INSERT / UPDATE / DELETE; how many rows it changed."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
