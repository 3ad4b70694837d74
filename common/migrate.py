"""Alembic upgrades, callable from the CLI, `genq up` and tests."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from common.config import get_settings
from common.db import normalize_url

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url or get_settings().db_url))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at url (default: the configured one) to revision."""
    command.upgrade(alembic_config(url), revision)
