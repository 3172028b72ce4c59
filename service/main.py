"""The FastAPI application: ``create_app(settings)`` wires the database, the broker, the
routes, the error mapping, metrics and the background loops (reconciler, result callbacks,
retention cleanup). ``uvicorn service.main:app`` serves it."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from mergeshield import __version__
from mergeshield.settings import Settings
from service import api_docs, dashboard, errors, metrics, reads
from service.auth import KeyCache
from service.routes import (
    bv_cache,
    endpoints,
    keys,
    merges,
    ops,
    scans,
    uploads,
    usage,
    watches,
    webhooks,
)
from worker import callbacks, cleanup, migrate
from worker.app import create_celery
from worker.db import Database
from worker.logs import configure
from worker.reconcile import Reconciler

log = logging.getLogger("mergeshield.api")


def create_app(settings: Settings | None = None, *, reconciler: bool = True) -> FastAPI:
    settings = settings or Settings()
    db = Database(settings.database())
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate.upgrade(db)
        for folder in (settings.uploads_dir, settings.scans_dir):
            folder.mkdir(parents=True, exist_ok=True)
        app.state.reads = reads.executor()  # short reads of async routes (service.reads)
        threads = []
        if reconciler:
            threads = [threading.Thread(target=_every, args=(loop, interval, stop), daemon=True,
                                        name=loop.__name__)
                       for loop, interval in ((_reconcile(app), settings.reconcile_interval),
                                              (_callbacks(app), settings.callback_poll_interval),
                                              (_cleanup(app), settings.cleanup_interval))]
            for thread in threads:
                thread.start()
        log.info("api ready", extra={"database": db.engine.dialect.name,
                                     "broker": "redis" if settings.redis_url else "filesystem",
                                     "auth": not settings.auth_disabled})
        yield
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        app.state.reads.shutdown(wait=True)
        db.dispose()

    app = FastAPI(title="MergeShield", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # api_docs serves them without a CDN
                  description="Scan fine-tuned checkpoints for merge-surviving backdoors and "
                              "sanitise them with Injection Backdoor Vector Subtraction (IBVS).")
    app.state.settings = settings
    app.state.db = db
    app.state.keys = KeyCache()  # verified API keys, for a few seconds (service.auth)
    app.state.celery = create_celery(settings)
    app.state.log = log
    app.state.registry = metrics.install(app, db, settings)
    errors.install(app)
    for module in (scans, merges, uploads, usage, keys, ops, webhooks, endpoints, watches,
                   bv_cache):
        app.include_router(module.router)
    dashboard.install(app)
    api_docs.install(app)
    return app


def _every(work: Callable[[], object], interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            work()
        except Exception:  # broker or database briefly away: the next pass tries again
            log.exception("%s pass failed", getattr(work, "__name__", "background"))


def _reconcile(app: FastAPI) -> Callable[[], object]:
    passes = Reconciler(app.state.db, app.state.celery, app.state.settings)

    def reconciler() -> object:
        return passes()

    return reconciler


def _cleanup(app: FastAPI) -> Callable[[], object]:
    def retention_cleanup() -> object:
        return cleanup.cleanup(app.state.db, app.state.settings)

    return retention_cleanup


def _callbacks(app: FastAPI) -> Callable[[], object]:
    """The result-callback sender (``worker.callbacks``): no redirects, one client reused."""
    client = httpx.Client(follow_redirects=False)

    def callback_sender() -> object:
        return callbacks.dispatch(app.state.db, app.state.settings, client)

    return callback_sender


def app() -> FastAPI:
    """Factory for ``uvicorn --factory service.main:app`` (and ``api --processes N``)."""
    settings = Settings()
    configure(settings.json_logs)
    return create_app(settings)
