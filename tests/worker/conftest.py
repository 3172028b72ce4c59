"""Fixtures for the worker tests: fresh databases on SQLite (tmp_path) and local PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.support.stack import PG_ADMIN, ensure_services, worker_redis_url
from worker.db import Database, Scan
from worker.migrate import upgrade

# ours alone: the service stacks use this process's Redis dbs 9 (default), 10 (faults), 12-13
# (resource limits), 14 (webhooks) and 15 (hostile inputs)
REDIS_URL = worker_redis_url(11)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards (psycopg 3 driver URL)."""
    ensure_services()
    name = f"ms_worker_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=("sqlite", "postgres"))
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A database without any table, on each backend."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'mergeshield.db'}"
    database = Database(url)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def db(empty_db: Database) -> Database:
    """A fresh database brought to head by ``worker.migrate.upgrade``, on each backend."""
    upgrade(empty_db)
    return empty_db


@pytest.fixture
def make_scan() -> Callable[..., Scan]:
    """Insert one Scan row directly: ``make_scan(db, **overrides)``."""

    def make(db: Database, **values: Any) -> Scan:
        fields: dict[str, Any] = {
            "owner": "alice", "request": {"scan": {"suspect": "zoo/suspect", "base": "zoo/base"}},
            "suspect": "zoo/suspect", "base": "zoo/base", "queue": "cpu", **values}
        with db.session() as s:
            scan = Scan(**fields)
            s.add(scan)
        return scan

    return make


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    ensure_services()
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()
