"""The Celery app's configuration, the queue routing table and what ``send_scan`` puts on Redis."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import redis

from mergeshield.settings import Settings
from tests.worker.conftest import REDIS_URL
from worker.app import QUEUES, SCAN_TASK, choose_queue, create_celery, send_scan

GB = 1024**3


@pytest.mark.parametrize(("device", "sizes", "gpu_workers", "queue"), [
    # asked explicitly: always honoured, whatever the sizes or the workers
    ("gpu", [10, 10], False, "gpu"),
    ("gpu", [None, None], True, "gpu"),
    ("cpu", [5 * GB, None], True, "cpu"),
    ("cpu", [10, 10], False, "cpu"),
    # auto: big or unknown-size (hub) models go to gpu, when a gpu worker is there
    ("auto", [2 * GB, 10], True, "gpu"),
    ("auto", [GB, 10], True, "gpu"),  # the threshold itself counts as big
    ("auto", [GB - 1, 10], True, "cpu"),
    ("auto", [None, 10], True, "gpu"),
    ("auto", [None, None], True, "gpu"),
    ("auto", [10, 20], True, "cpu"),
    ("auto", [2 * GB, 10], False, "cpu"),
    ("auto", [None, None], False, "cpu"),
    ("auto", [10, 20], False, "cpu"),
    ("auto", [], True, "cpu"),
])
def test_choose_queue(device: str, sizes: list[int | None], gpu_workers: bool, queue: str
                      ) -> None:
    assert choose_queue(device, sizes, GB, gpu_workers) == queue


def settings_for(tmp_path: Path, redis_url: str | None) -> Settings:
    return Settings(redis_url=redis_url, data_dir=tmp_path, scan_soft_time_limit=100,
                    scan_hard_time_limit=130)


@pytest.mark.parametrize("broker", ["redis", "filesystem"])
def test_create_celery_config(tmp_path: Path, broker: str) -> None:
    app = create_celery(settings_for(tmp_path, REDIS_URL if broker == "redis" else None))
    conf = app.conf
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]  # a pickled message is never loaded
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (100, 130)
    assert conf.task_ignore_result is True
    assert conf.task_default_queue == "cpu"
    queues = {q.name: q for q in conf.task_queues}
    assert set(queues) == set(QUEUES) == {"gpu", "cpu"}
    for name, queue in queues.items():  # each queue on its own exchange, routed by its name
        assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == (
            name, "direct", name)
    options = conf.broker_transport_options
    if broker == "redis":
        assert conf.broker_url == REDIS_URL
        assert options == {"visibility_timeout": 130 + 600}  # longer than any scan may run
    else:
        assert conf.broker_url == "filesystem://"
        folder = tmp_path / "broker"
        assert options["data_folder_in"] == options["data_folder_out"] == str(folder / "queue")
        assert options["processed_folder"] == str(folder / "processed")
        assert options["control_folder"] == str(folder / "control")
        assert all((folder / sub).is_dir() for sub in ("queue", "processed", "control"))
    app.close()


@pytest.mark.parametrize("queue", QUEUES)
def test_send_scan_puts_a_json_message_named_by_the_scan(
        tmp_path: Path, redis_client: redis.Redis, queue: str) -> None:
    app = create_celery(settings_for(tmp_path, REDIS_URL))
    try:
        send_scan(app, "scan0123", queue)
    finally:
        app.close()
    other = next(q for q in QUEUES if q != queue)
    assert redis_client.llen(other) == 0
    [raw] = redis_client.lrange(queue, 0, -1)
    message = json.loads(raw)
    assert message["content-type"] == "application/json"
    assert message["headers"]["id"] == "scan0123"  # the scan id is the task id
    assert message["headers"]["task"] == SCAN_TASK
    assert message["properties"]["delivery_info"]["routing_key"] == queue
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == (["scan0123"], {})
