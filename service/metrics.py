"""Prometheus metrics. Job counts, queue depth, workers and durations are read from the
database at scrape time (it is the truth, and every API replica then reports the same);
HTTP latency is measured in this process.

Every job metric carries ``kind`` (``scan`` or ``merge``, ``worker.db.KINDS``): a merge plan is a
row of the scans table, so one query counts both and the label tells them apart. Each (kind,
state) and (kind, queue) pair is exported, zeros included, so a rate or an alert never sees a
series appear from nowhere. ``mergeshield_scans`` keeps its name (the existing dashboards' and
alerts' series, now one per kind): sum it over ``kind`` for the total of both. Scans answered from
the cache (``cached_from``) ran nothing and have no duration.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import timedelta

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mergeshield.settings import Settings
from worker.app import QUEUES
from worker.db import KINDS, STATES, Database, Scan, Worker, now

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
# states with a run time (a cancelled job's span says when it was cancelled, not how long it runs)
TIMED = ("succeeded", "failed")


class DatabaseCollector(Collector):
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings

    def collect(self) -> Iterable[Metric]:
        by_state = GaugeMetricFamily("mergeshield_scans", "Jobs (scans and merges) by state",
                                     labels=["kind", "state"])
        depth = GaugeMetricFamily("mergeshield_queue_depth", "Queued jobs by queue",
                                  labels=["kind", "queue"])
        workers = GaugeMetricFamily("mergeshield_workers_alive",
                                    "Workers that beat within stale_after")
        with self.db.session() as s:
            counts = {(k, st): n for k, st, n in s.execute(
                select(Scan.kind, Scan.state, func.count()).group_by(Scan.kind, Scan.state))}
            queued = {(k, q): n for k, q, n in s.execute(
                select(Scan.kind, Scan.queue, func.count()).where(Scan.state == "queued")
                .group_by(Scan.kind, Scan.queue))}
            alive = s.scalar(select(func.count()).select_from(Worker).where(
                Worker.last_seen > now() - timedelta(seconds=self.settings.stale_after))) or 0
            spans = s.execute(select(Scan.kind, Scan.state, Scan.started_at, Scan.finished_at)
                              .where(Scan.state.in_(TIMED), Scan.started_at.is_not(None),
                                     Scan.finished_at.is_not(None),
                                     Scan.cached_from.is_(None))).all()
        for kind in KINDS:
            for state in STATES:
                by_state.add_metric([kind, state], counts.get((kind, state), 0))
            for queue in QUEUES:
                depth.add_metric([kind, queue], queued.get((kind, queue), 0))
        workers.add_metric([], alive)
        yield from (by_state, depth, workers)
        durations = HistogramMetricFamily("mergeshield_scan_duration_seconds",
                                          "Run time of finished jobs (scans and merges)",
                                          labels=["kind", "state"])
        for kind in KINDS:
            for state in TIMED:
                secs = [(f - s).total_seconds() for k, st, s, f in spans
                        if k == kind and st == state and s and f]
                buckets = [(str(b), sum(x <= b for x in secs)) for b in DURATION_BUCKETS]
                buckets.append(("+Inf", len(secs)))
                durations.add_metric([kind, state], buckets, sum_value=sum(secs))
        yield durations


def install(app: FastAPI, db: Database, settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db, settings))
    latency = Histogram("mergeshield_http_request_seconds", "HTTP request latency",
                        ["method", "route", "status"], registry=registry,
                        buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))

    app.add_middleware(RequestTimer, latency=latency)
    return registry


class RequestTimer:
    """Times each HTTP request, from its arrival to its response's start, into ``latency`` by
    method, route template and status. Pure ASGI: ``@app.middleware("http")``
    (BaseHTTPMiddleware) ran every request through a task group and memory streams, which cost
    more than a status read itself (docs/decisions.md, "The API's per-request cost")."""

    def __init__(self, app: ASGIApp, latency: Histogram) -> None:
        self.app, self.latency = app, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":  # the route is matched by now
                path = getattr(scope.get("route"), "path", "unmatched")
                self.latency.labels(scope["method"], path, str(message["status"])).observe(
                    time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, timed)
