"""The FastAPI application: ``create_app(settings)`` wires the database, the broker, the
routes, the error mapping, metrics and the reconciler. ``uvicorn service.main:app`` serves it."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mergeshield import __version__
from mergeshield.settings import Settings
from service import errors, metrics
from service.routes import keys, ops, scans, uploads
from worker import migrate
from worker.app import create_celery
from worker.db import Database
from worker.logs import configure
from worker.reconcile import reconcile

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
        thread = None
        if reconciler:
            thread = threading.Thread(target=_reconcile_loop, args=(app, stop), daemon=True,
                                      name="reconciler")
            thread.start()
        log.info("api ready", extra={"database": db.engine.dialect.name,
                                     "broker": "redis" if settings.redis_url else "filesystem",
                                     "auth": not settings.auth_disabled})
        yield
        stop.set()
        if thread is not None:
            thread.join(timeout=5)
        db.dispose()

    app = FastAPI(title="MergeShield", version=__version__, lifespan=lifespan,
                  description="Scan fine-tuned checkpoints for merge-surviving backdoors and "
                              "sanitise them with Injection Backdoor Vector Subtraction (IBVS).")
    app.state.settings = settings
    app.state.db = db
    app.state.celery = create_celery(settings)
    app.state.log = log
    app.state.registry = metrics.install(app, db, settings)
    errors.install(app)
    for module in (scans, uploads, keys, ops):
        app.include_router(module.router)
    return app


def _reconcile_loop(app: FastAPI, stop: threading.Event) -> None:
    settings: Settings = app.state.settings
    while not stop.wait(settings.reconcile_interval):
        try:
            reconcile(app.state.db, app.state.celery, settings)
        except Exception:  # broker or database briefly away: the next pass tries again
            log.exception("reconcile pass failed")


def app() -> FastAPI:
    """Factory for ``uvicorn --factory service.main:app`` (and ``api --processes N``)."""
    settings = Settings()
    configure(settings.json_logs)
    return create_app(settings)
