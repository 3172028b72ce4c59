"""The Celery application: JSON only, explicit task names, late acks, one task at a time.

The broker is Redis when ``REDIS_URL`` is set, else Celery's filesystem transport under the data
folder (the embedded default: one machine, no server), made first-in-first-out by
``worker.broker``. Two queues, ``gpu`` and ``cpu``; the API
routes each scan by its needs (``worker.routing``). Results are not stored in Celery: the
database is the source of truth, so ``task_ignore_result`` is on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from mergeshield.settings import Settings
from worker.broker import TRANSPORT, rename_legacy

SCAN_TASK = "mergeshield.scan"
QUEUES = ("gpu", "cpu")


def prepare_broker(settings: Settings) -> None:
    """Create the filesystem broker's folders (nothing to do for Redis)."""
    if settings.redis_url is None:
        for sub in ("queue", "processed", "control"):
            (settings.broker_dir / sub).mkdir(parents=True, exist_ok=True)
        rename_legacy(settings.broker_dir / "queue")  # queued before the FIFO names


def create_celery(settings: Settings, *, prepare: bool = True) -> Celery:
    """A Celery app for ``settings``; the API uses it to send, workers to consume."""
    app = Celery("mergeshield", broker=settings.broker(), include=["worker.tasks"])
    if prepare:
        prepare_broker(settings)
    transport: dict[str, Any] = {}
    if settings.redis_url is None:  # filesystem, in submission order (worker.broker)
        app.conf.broker_transport = TRANSPORT
        folder = settings.broker_dir
        queue = str(folder / "queue")
        transport = {"data_folder_in": queue, "data_folder_out": queue,
                     "processed_folder": str(folder / "processed"),
                     "control_folder": str(folder / "control"), "store_processed": False}
    else:
        # an unacked message comes back after this long: longer than any scan may run
        transport = {"visibility_timeout": settings.scan_hard_time_limit + 600}
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True, result_backend=None,
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.scan_soft_time_limit,
        task_time_limit=settings.scan_hard_time_limit,
        task_queues=[Queue(q, Exchange(q), routing_key=q) for q in QUEUES],
        task_default_queue="cpu",
        broker_transport_options=transport, broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False, worker_send_task_events=False,
        task_send_sent_event=False, enable_utc=True,
    )
    return app


def send_scan(app: Celery, scan_id: str, queue: str) -> None:
    """Put one scan on ``queue``; its id is the task id, so a resend is recognisable."""
    app.send_task(SCAN_TASK, args=[scan_id], task_id=scan_id, queue=queue, routing_key=queue)


def choose_queue(device: str, sizes: list[int | None], gpu_min_bytes: int,
                 gpu_workers: bool | Callable[[], bool]) -> str:
    """``gpu``/``cpu`` as asked; for ``auto``, big or unknown-size (hub) models go to ``gpu``
    when a worker consumes it (``gpu_workers`` may be a check, asked only then), else ``cpu``."""
    if device in QUEUES:
        return device
    if not any(size is None or size >= gpu_min_bytes for size in sizes):
        return "cpu"
    return "gpu" if (gpu_workers() if callable(gpu_workers) else gpu_workers) else "cpu"


# for `celery -A worker.app` and the task decorators; importing it creates no folder
app = create_celery(Settings(), prepare=False)

