"""The database: the source of truth for scans, uploads, API keys, workers, the BV_inj cache,
webhook watches, callback endpoints and deliveries.

A merge plan (``POST /v1/merges``) is a job of the same table as a scan (``Scan.kind`` "merge"),
so it lives the same life with no code of its own: claimed, beating, cancelled, re-sent by the
reconciler, counted by the quotas, its callback sent and its artifacts expired like a scan's.

The broker only carries scan ids; everything a scan is (its request, state, stage, result) lives
here, so a scan survives an API restart, a worker crash and a broker that forgot its queues. The
schema is created by Alembic migrations (``worker/migrations``), never by ``create_all``. This
module lives in ``worker/`` because workers write progress and results directly and the layers
only let ``service`` import ``worker``, not the other way round.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

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
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

FINISHED = ("succeeded", "failed", "cancelled")
T = TypeVar("T")
log = logging.getLogger("mergeshield.db")
STATES = ("queued", "running", *FINISHED)
KINDS = ("scan", "merge")  # a scan of one model; a merge plan (worker/merge_jobs.py)


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
    kind: Mapped[str] = mapped_column(String(8), index=True, default="scan",
                                      server_default="scan")  # one of KINDS
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    stage: Mapped[str | None] = mapped_column(String(64), default=None)
    percent: Mapped[float] = mapped_column(Float, default=0.0)
    # the API's request as submitted (model references, options; a merge: its plan) and the
    # queue it went to
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    # hub id or upload label, for lists (a merge: its models, comma-separated, cut to fit)
    suspect: Mapped[str] = mapped_column(String(300))
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
    # when the retention cleanup removed the report files and the cleaned checkpoint (the row,
    # its verdict and summary stay); None while they exist
    artifacts_expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

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


class Watch(Base):
    """A rule for the Hub's webhook: scan every new commit on ``main`` of the matching model
    repos against ``base``, with the scan options in ``scan`` (a ``ScanCreate`` body without
    its suspect). Or a plan's watch: ``merge`` holds a checked merge plan (hub ids only) and
    ``scan`` is None; a new ``main`` commit of a repo the plan follows there (an entry without a
    revision or at ``@main``; listed in ``repo`` for display) re-runs it as a merge. Rate limit:
    at most ``rate_limit`` jobs per ``rate_window`` seconds, counted in a fixed window that a
    conditional UPDATE opens and fills (atomic on both databases)."""

    __tablename__ = "watches"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(32), index=True)
    repo: Mapped[str] = mapped_column(String(200))  # a hub id, or a prefix of one
    prefix: Mapped[bool] = mapped_column(default=False)  # match repo ids starting with ``repo``
    scan: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    merge: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)  # a merge plan
    callback_url: Mapped[str | None] = mapped_column(Text, default=None)
    # open a discussion with the verdict on the scanned repo (needs a token that may write)
    open_discussion: Mapped[bool] = mapped_column(default=False)
    secret_hash: Mapped[str | None] = mapped_column(String(64), default=None)  # sha256 hex
    rate_limit: Mapped[int] = mapped_column(Integer)
    rate_window: Mapped[int] = mapped_column(Integer)  # seconds
    window_start: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    window_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


class CallbackEndpoint(Base):
    """Where result callbacks go, and the secrets (``whsec_...``, newest first) that sign them.
    Two secrets at once while a receiver moves to the new one: every callback carries both
    signatures."""

    __tablename__ = "callback_endpoints"
    __table_args__ = (UniqueConstraint("owner", "url"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(32), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    secrets: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class Delivery(Base):
    """One webhook delivery, either way.

    inbound (the Hub to us), state: accepted | duplicate | ignored | rate_limited | failed |
    refused.
    outbound (a scan's result to its callback endpoint, or as a discussion on the scanned Hub
    repo: ``url`` ``hf-discussion:<repo>``), state: waiting (the scan runs) → pending (due at
    ``next_attempt_at``; retried with backoff) → delivered | dead, or skipped (a discussion
    for a scan that did not succeed). A sender
    claims a pending row by moving ``next_attempt_at`` forward with a conditional UPDATE, so
    two senders never post the same attempt; a sender that dies leaves it due again.
    """

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("dedup_key"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str | None] = mapped_column(String(32), index=True)  # None: the admin's only
    direction: Mapped[str] = mapped_column(String(8), index=True)  # inbound | outbound
    state: Mapped[str] = mapped_column(String(16), index=True)
    event: Mapped[str | None] = mapped_column(String(64), default=None)
    url: Mapped[str | None] = mapped_column(Text, default=None)
    repo: Mapped[str | None] = mapped_column(String(200), default=None)  # inbound: the Hub repo
    revision: Mapped[str | None] = mapped_column(String(64), default=None)  # and its commit
    # outbound: "scan:<id>" (a merge's "merge:<id>"), one callback per job; inbound: None
    dedup_key: Mapped[str | None] = mapped_column(String(80), default=None)
    scan_id: Mapped[str | None] = mapped_column(String(32), index=True, default=None)
    scan_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    watch_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    endpoint_id: Mapped[str | None] = mapped_column(ForeignKey("callback_endpoints.id"),
                                                    default=None)
    headers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # never a secret
    payload: Mapped[Any] = mapped_column(JSON, nullable=True, default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)  # why ignored/refused/failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True,
                                                             default=None)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    response_status: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


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
        else:  # a server that does not answer is an error after 10 s, not a hang
            kwargs.update(pool_size=10, max_overflow=30, connect_args={"connect_timeout": 10})
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # one-statement reads (``reading``): outside a transaction on PostgreSQL; pysqlite opens
        # none for a SELECT anyway, and switching its mode would cost more than it saves
        self._reader = self.engine if url.startswith("sqlite") else \
            self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessions() as s, s.begin():
            yield s

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A pooled connection for one read statement (the API's status poll): on PostgreSQL
        without BEGIN and ROLLBACK, two of its four round trips."""
        with self._reader.connect() as conn:
            yield conn

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


# the database is unreachable (restarting, failing over, network): worth waiting for
DB_AWAY = (OperationalError, InterfaceError)


def retrying(work: Callable[[], T], *, seconds: float) -> T:
    """``work()``, tried again while the database is unreachable, for up to ``seconds``.
    Only for work that may run twice (a conditional UPDATE)."""
    deadline = time.monotonic() + seconds
    pause = 0.5
    while True:
        try:
            return work()
        except DB_AWAY:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("database unreachable; trying again in %.1f s", pause)
            time.sleep(pause)
            pause = min(2 * pause, 5.0)


def _sqlite_pragmas(conn: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; NORMAL sync is safe with WAL
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
