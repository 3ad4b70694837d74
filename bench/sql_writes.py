"""Item writes into SQL: common.results.write_items vs a raw Core executemany of the same rows."""

from __future__ import annotations

import os
import socket
import time
import uuid

from sqlalchemy import bindparam, delete, insert, update

from bench.harness import Figure, Report, scratch_dir

N_ITEMS, ROUNDS = 10_000, 5
CHUNK = 256  # GENQ_ITEM_CHUNK's default: what a shard commits at once


def postgres_url() -> str | None:
    url = os.environ.get("GENQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError:
        return None
    return url


def bench_one(url: str) -> tuple[float, float, float]:
    """(chunked, one-call, raw) items/s on the database at url (tables made by migrations)."""
    from common import results
    from common.db import engine_for, normalize_url, session_factory
    from common.migrate import upgrade
    from common.models import ITEMS, Item, Job, new_id, utcnow

    upgrade(url)
    engine = engine_for(normalize_url(url))
    job_id = new_id("job_bench_")[:40]
    rates = {"chunked": 0.0, "genq": 0.0, "raw": 0.0}
    with session_factory(engine)() as session:
        session.add(Job(id=job_id, owner="bench", type="generate", spec={}))
        session.commit()
        # Interleaved rounds, best of each: a WAL checkpoint or autovacuum hits one run only.
        # The order rotates each round: autovacuum wakes after the first updates of a round
        # and slowed whichever mode always came last (PostgreSQL raw once ran at half speed).
        modes = list(rates)
        order = [(modes[(r + k) % len(modes)], r) for r in range(ROUNDS)
                 for k in range(len(modes))]
        for mode, rnd in order:
            tag = f"{mode}{rnd}"
            session.execute(insert(Item), [
                {"job_id": job_id, "index": i, "custom_id": f"{tag}-{i}", "status": "pending",
                 "request": {"gen": {"prompt": "x" * 40}}} for i in range(N_ITEMS)])
            session.commit()
            ids = [row.id for row in session.query(Item.id).filter(
                Item.job_id == job_id, Item.custom_id.like(f"{tag}-%")).order_by(Item.id)]
            rows = [{"id": i, "status": "succeeded", "response": {"texts": ["y" * 60]},
                     "tokens_in": 10, "tokens_out": 16} for i in ids]
            start = time.perf_counter()
            if mode != "raw":
                size = CHUNK if mode == "chunked" else len(rows)
                for k in range(0, len(rows), size):
                    results.write_items(session, rows[k : k + size])
            else:
                table = ITEMS  # the same columns write_items sets
                stmt = update(table).where(table.c.id == bindparam("b_id")).values(
                    status=bindparam("b_status"), response=bindparam("b_response"),
                    error=bindparam("b_error"), tokens_in=bindparam("b_in"),
                    tokens_out=bindparam("b_out"), finished_at=bindparam("b_at"))
                now = utcnow()
                session.connection().execute(stmt, [
                    {"b_id": r["id"], "b_status": r["status"], "b_response": r["response"],
                     "b_error": None, "b_in": r["tokens_in"], "b_out": r["tokens_out"],
                     "b_at": now} for r in rows])
                session.commit()
            rates[mode] = max(rates[mode], N_ITEMS / (time.perf_counter() - start))
        session.execute(delete(Item).where(Item.job_id == job_id))
        session.execute(delete(Job).where(Job.id == job_id))
        session.commit()
    return rates["chunked"], rates["genq"], rates["raw"]


def bench_sql_writes(report: Report) -> None:
    with scratch_dir("genq-bench-sql-") as folder:
        _bench_sql_writes(report, f"sqlite:///{folder}/bench-{uuid.uuid4().hex[:6]}.db")


def _bench_sql_writes(report: Report, sqlite: str) -> None:
    targets = [("SQLite", sqlite)] + ([("PostgreSQL", pg)] if (pg := postgres_url()) else [])
    for name, url in targets:
        chunked, genq, raw = bench_one(url)
        report.add(Figure(f"item writes into {name} (write_items, one call)", genq, "items/s",
                          baseline=raw, target=0.8,
                          note="raw: one Core executemany setting the same columns, one commit"))
        report.add(Figure(f"item writes into {name} ({CHUNK}-item commits)", chunked, "items/s",
                          baseline=raw,
                          note="as a shard writes: a commit per GENQ_ITEM_CHUNK items "
                               "(per-item resume)"))
