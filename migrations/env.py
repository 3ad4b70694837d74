"""Alembic environment: the URL comes from the caller's config or genq's settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from common.config import get_settings
from common.db import normalize_url
from common.models import Base

config = context.config
url = normalize_url(config.get_main_option("sqlalchemy.url") or get_settings().db_url)


def run_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        connectable = engine_from_config(
            {"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool
        ).connect()
    with connectable as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
