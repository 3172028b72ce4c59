"""The database: the source of truth for scans, uploads, API keys, workers and the BV_inj cache.

The broker only carries scan ids; everything a scan is (its request, state, stage, result) lives
here, so a scan survives an API restart, a worker crash and a broker that forgot its queues. The
schema is created by Alembic migrations (``worker/migrations``), never by ``create_all``. This
module lives in ``worker/`` because workers write progress and results directly and the layers
only let ``service`` import ``worker``, not the other way round.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

FINISHED = ("succeeded", "failed", "cancelled")
STATES = ("queued", "running", *FINISHED)


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every database (SQLite drops the zone; this puts it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    # sha256 of the key: keys are 256 random bits, so a fast hash is enough (no dictionary attack)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in lists, to tell keys apart
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class Upload(Base):
    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("owner", "sha256"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(32), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))  # safetensors | bin | archive
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    # what a scan reads, relative to data_dir: the file, or the unpacked archive's model root
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


class Scan(Base):
    __tablename__ = "scans"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    stage: Mapped[str | None] = mapped_column(String(64), default=None)
    percent: Mapped[float] = mapped_column(Float, default=0.0)
    # the API's request as submitted (model references, options) and the queue it went to
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    suspect: Mapped[str] = mapped_column(String(300))  # hub id or upload file name, for lists
    base: Mapped[str] = mapped_column(String(300))
    queue: Mapped[str] = mapped_column(String(16))
    force: Mapped[bool] = mapped_column(default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    cache_key: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    cached_from: Mapped[str | None] = mapped_column(ForeignKey("scans.id"), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    # the outcome, copied from the report for lists and filters
    verdict: Mapped[str | None] = mapped_column(String(32), index=True, default=None)
    severity: Mapped[str | None] = mapped_column(String(16), default=None)
    # folder with report.json (+ sarif/html) and the cleaned checkpoint, relative to data_dir
    result_dir: Mapped[str | None] = mapped_column(Text, default=None)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class BvCacheEntry(Base):
    """One injection BV per (base revision, recipe, data): built once, shared by all scans."""

    __tablename__ = "bv_cache"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # building | ready
    builder: Mapped[str | None] = mapped_column(String(200), default=None)
    scan_id: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


class Worker(Base):
    """Workers announce themselves here; /readyz and /metrics read it."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    queues: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


class Database:
    """An engine and a session factory for one URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=30)
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessions() as s, s.begin():
            yield s

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(conn: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; NORMAL sync is safe with WAL
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
