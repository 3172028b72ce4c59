"""Prometheus metrics. Scan counts, queue depth, workers and durations are read from the
database at scrape time (it is the truth, and every API replica then reports the same);
HTTP latency is measured in this process."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from mergeshield.settings import Settings
from worker.db import STATES, Database, Scan, Worker, now

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


class DatabaseCollector(Collector):
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings

    def collect(self) -> Iterable[Metric]:
        by_state = GaugeMetricFamily("mergeshield_scans", "Scans by state", labels=["state"])
        depth = GaugeMetricFamily("mergeshield_queue_depth", "Queued scans by queue",
                                  labels=["queue"])
        workers = GaugeMetricFamily("mergeshield_workers_alive",
                                    "Workers that beat within stale_after")
        with self.db.session() as s:
            counts = dict(s.execute(select(Scan.state, func.count()).group_by(Scan.state)).all())
            queued = dict(s.execute(select(Scan.queue, func.count())
                                    .where(Scan.state == "queued").group_by(Scan.queue)).all())
            alive = s.scalar(select(func.count()).select_from(Worker).where(
                Worker.last_seen > now() - timedelta(seconds=self.settings.stale_after))) or 0
            spans = s.execute(select(Scan.state, Scan.started_at, Scan.finished_at).where(
                Scan.state.in_(("succeeded", "failed")), Scan.started_at.is_not(None),
                Scan.finished_at.is_not(None), Scan.cached_from.is_(None))).all()
        for state in STATES:
            by_state.add_metric([state], counts.get(state, 0))
        for queue in ("gpu", "cpu"):
            depth.add_metric([queue], queued.get(queue, 0))
        workers.add_metric([], alive)
        yield from (by_state, depth, workers)
        durations = HistogramMetricFamily("mergeshield_scan_duration_seconds",
                                          "Run time of finished scans", labels=["state"])
        for state in ("succeeded", "failed"):
            secs = [(f - s).total_seconds() for st, s, f in spans if st == state and s and f]
            buckets = [(str(b), sum(x <= b for x in secs)) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", len(secs)))
            durations.add_metric([state], buckets, sum_value=sum(secs))
        yield durations


def install(app: FastAPI, db: Database, settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db, settings))
    latency = Histogram("mergeshield_http_request_seconds", "HTTP request latency",
                        ["method", "route", "status"], registry=registry,
                        buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))

    @app.middleware("http")
    async def _time(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                    ) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        latency.labels(request.method, path, str(response.status_code)).observe(
            time.perf_counter() - t0)
        return response

    return registry
