"""Bring a database's schema up to date with the Alembic migrations in ``worker/migrations``."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from worker.db import Database

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("mergeshield.db")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(db: Database) -> None:
    """Run pending migrations; on PostgreSQL an advisory lock keeps concurrent starters in line.
    A migration that ran is logged once (alembic's own INFO lines are silenced: worker/logs.py)."""
    before = revision(db)
    if db.engine.dialect.name == "postgresql":
        with db.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(7405)"))  # any constant, ours alone
            try:
                command.upgrade(alembic_config(db.url), "head")
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(7405)"))
                conn.commit()
    else:
        command.upgrade(alembic_config(db.url), "head")
    after = revision(db)
    if after != before:
        log.info("database migrated", extra={"from_revision": before, "to_revision": after})


def revision(db: Database) -> str | None:
    """The schema revision the database is at (None: no schema yet)."""
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
