"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text, update

from worker.db import Base, Database, Scan
from worker.migrate import alembic_config, revision, upgrade


def schema_diff(db: Database) -> list[Any]:
    """What autogenerate would change to make the database match the models."""
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def test_migrations_build_the_models_schema(empty_db: Database) -> None:
    assert inspect(empty_db.engine).get_table_names() == []
    upgrade(empty_db)
    assert schema_diff(empty_db) == []
    head = ScriptDirectory.from_config(alembic_config(empty_db.url)).get_current_head()
    assert head is not None and revision(empty_db) == head


def test_upgrade_twice_is_a_no_op(db: Database, make_scan: Callable[..., Scan]) -> None:
    scan = make_scan(db)
    tables = sorted(inspect(db.engine).get_table_names())
    before = revision(db)
    upgrade(db)
    assert revision(db) == before
    assert sorted(inspect(db.engine).get_table_names()) == tables
    assert schema_diff(db) == []
    with db.session() as s:  # nothing was dropped and re-created
        assert s.scalars(select(Scan.id)).all() == [scan.id]
        assert s.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1


def test_utc_datetime_round_trips_aware_utc_on_sqlite(
        tmp_path: Path, make_scan: Callable[..., Scan]) -> None:
    url = f"sqlite:///{tmp_path / 'mergeshield.db'}"
    db = Database(url)
    upgrade(db)
    plus_two = datetime(2026, 3, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    scan = make_scan(db, enqueued_at=plus_two)
    db.dispose()
    db = Database(url)  # a new engine and session: the values come from the file
    try:
        with db.session() as s:
            row = s.get(Scan, scan.id)
            assert row is not None and row.enqueued_at is not None
            assert row.enqueued_at == plus_two  # the same instant...
            assert row.enqueued_at.utcoffset() == timedelta(0)  # ...told in UTC
            assert row.enqueued_at.replace(tzinfo=None) == datetime(2026, 3, 1, 12, 30, 15, 123456)
            assert row.created_at.utcoffset() == timedelta(0)
            assert abs(row.created_at - datetime.now(UTC)) < timedelta(minutes=1)
            assert row.heartbeat_at is None  # NULL stays NULL
            stored = s.execute(text("SELECT enqueued_at FROM scans")).scalar_one()
        assert str(stored).startswith("2026-03-01 12:30:15")  # stored as UTC, so it sorts right
    finally:
        db.dispose()


def test_the_keys_command_prints_its_json_and_logs_a_migration_once(tmp_path: Path) -> None:
    """``mergeshield keys create`` on a new database: one JSON line on stdout, one log line that
    says the schema was migrated, none of alembic's own INFO lines (issue 15)."""
    env = {**os.environ, "MERGESHIELD_DATA_DIR": str(tmp_path / "data")}
    env.pop("DATABASE_URL", None)

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "service.cli", "keys", *args], env=env,
                              capture_output=True, text=True, timeout=120, check=True)

    made = keys("create", "--name", "ci")
    assert json.loads(made.stdout)["key"].startswith("msk_")
    logged = [json.loads(line) for line in made.stderr.splitlines()]
    assert [r["message"] for r in logged] == ["database migrated"]
    assert logged[0]["from_revision"] is None and logged[0]["to_revision"]
    listed = keys("list")
    assert json.loads(listed.stdout)["name"] == "ci" and listed.stderr == ""


def test_reading_runs_one_statement_outside_a_transaction_that_sessions_keep(
        db: Database, make_scan: Callable[..., Scan]) -> None:
    """``Database.reading`` (the API's status poll): no BEGIN on PostgreSQL; the pooled
    connection goes back to transactions for the sessions that rely on them."""
    scan = make_scan(db)
    postgres = db.engine.dialect.name == "postgresql"
    with db.reading() as conn:
        assert conn.execute(select(Scan.state).where(Scan.id == scan.id)).scalar_one() == "queued"
        if postgres:
            assert conn.connection.driver_connection.autocommit is True
    for _ in range(3):  # whichever pooled connection a session gets
        with db.session() as s:
            if postgres:
                raw = s.connection().connection.driver_connection
                assert raw.autocommit is False
            s.execute(update(Scan).where(Scan.id == scan.id).values(state="running"))
            s.rollback()  # undone: it ran in a transaction
        with db.reading() as conn:
            assert conn.execute(select(Scan.state).where(Scan.id == scan.id)).scalar_one() \
                == "queued"
