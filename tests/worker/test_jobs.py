"""A scan's life in the database: claim once, take over the dead, report progress, finish."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from mergeshield import cancellation, pipeline
from mergeshield.pipeline import percent
from mergeshield.settings import Settings
from worker.db import Database, Scan, now
from worker.jobs import (
    CANCEL_POLL,
    Job,
    ScanCancelled,
    claim,
    earlier_result,
    heartbeat,
    run,
)

MakeScan = Callable[..., Scan]


def row(db: Database, scan_id: str) -> Scan:
    with db.session() as s:
        scan = s.get(Scan, scan_id)
        assert scan is not None
        return scan


def set_row(db: Database, scan_id: str, **values: object) -> None:
    with db.session() as s:
        s.execute(update(Scan).where(Scan.id == scan_id).values(**values))


def test_claim_of_a_queued_scan_succeeds_once(db: Database, make_scan: MakeScan) -> None:
    scan = make_scan(db)
    job = claim(db, scan.id, "w1", stale_after=60)
    assert job is not None and job.scan.id == scan.id and job.worker == "w1"
    stored = row(db, scan.id)
    assert (stored.state, stored.worker, stored.attempts) == ("running", "w1", 1)
    assert stored.started_at is not None and stored.heartbeat_at is not None
    assert claim(db, scan.id, "w1", stale_after=60) is None  # a second delivery
    assert claim(db, scan.id, "w2", stale_after=60) is None
    assert row(db, scan.id).attempts == 1


def test_two_concurrent_claims_give_one_job(db: Database, make_scan: MakeScan) -> None:
    scan = make_scan(db)
    start = threading.Barrier(2)

    def take(worker: str) -> Job | None:
        start.wait(timeout=10)
        return claim(db, scan.id, worker, stale_after=60)

    with ThreadPoolExecutor(2) as pool:
        jobs = list(pool.map(take, ("w1", "w2")))
    won = [j for j in jobs if j is not None]
    assert len(won) == 1
    stored = row(db, scan.id)
    assert stored.worker == won[0].worker and stored.attempts == 1


def test_claim_leaves_a_live_running_scan_alone(db: Database, make_scan: MakeScan) -> None:
    scan = make_scan(db, state="running", worker="alive", attempts=1, heartbeat_at=now())
    assert claim(db, scan.id, "w2", stale_after=60) is None
    stored = row(db, scan.id)
    assert (stored.state, stored.worker, stored.attempts) == ("running", "alive", 1)


def test_claim_takes_over_a_stale_running_scan(db: Database, make_scan: MakeScan) -> None:
    scan = make_scan(db, state="running", worker="dead", attempts=1,
                     heartbeat_at=now() - timedelta(seconds=120), error_code="x")
    job = claim(db, scan.id, "w2", stale_after=60)
    assert job is not None and job.worker == "w2"
    stored = row(db, scan.id)
    assert (stored.state, stored.worker, stored.attempts) == ("running", "w2", 2)
    assert stored.error_code is None
    assert stored.heartbeat_at is not None and stored.heartbeat_at > now() - timedelta(seconds=30)


@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled"])
def test_claim_never_reruns_a_finished_scan(db: Database, make_scan: MakeScan, state: str
                                            ) -> None:
    scan = make_scan(db, state=state, heartbeat_at=now() - timedelta(hours=1))
    assert claim(db, scan.id, "w", stale_after=60) is None
    assert row(db, scan.id).state == state


def test_progress_writes_stage_and_percent(db: Database, make_scan: MakeScan) -> None:
    job = claim(db, make_scan(db).id, "w", stale_after=60)
    assert job is not None
    job.progress("sweep", 0.5)
    stored = row(db, job.scan.id)
    assert stored.stage == "sweep" and stored.percent == percent("sweep", 0.5) == 65.0
    job.progress("summary", 1.0)  # a stage's end is always written, however soon
    stored = row(db, job.scan.id)
    assert stored.stage == "summary" and stored.percent == percent("summary", 1.0)
    job.progress("some-new-stage", 0.0)  # unknown stage: the stage moves, percent stays
    stored = row(db, job.scan.id)
    assert stored.stage == "some-new-stage" and stored.percent == percent("summary", 1.0)


def test_progress_raises_once_the_scan_is_cancelled(db: Database, make_scan: MakeScan) -> None:
    job = claim(db, make_scan(db).id, "w", stale_after=60)
    assert job is not None
    job.progress("resolve", 0.0)
    set_row(db, job.scan.id, state="cancelled")
    with pytest.raises(ScanCancelled):
        job.progress("task_vector", 0.0)
    stored = row(db, job.scan.id)
    assert stored.state == "cancelled" and stored.stage == "resolve"


def test_progress_raises_when_another_worker_took_the_scan(db: Database, make_scan: MakeScan
                                                           ) -> None:
    job = claim(db, make_scan(db).id, "w1", stale_after=60)
    assert job is not None
    set_row(db, job.scan.id, heartbeat_at=now() - timedelta(seconds=120))
    assert claim(db, job.scan.id, "w2", stale_after=60) is not None
    with pytest.raises(ScanCancelled):
        job.progress("resolve", 1.0)
    assert row(db, job.scan.id).worker == "w2"


def test_fail_records_code_and_message(db: Database, make_scan: MakeScan) -> None:
    job = claim(db, make_scan(db).id, "w", stale_after=60)
    assert job is not None
    job.fail("source_not_found", "upload it again")
    stored = row(db, job.scan.id)
    assert (stored.state, stored.error_code, stored.error_message) == (
        "failed", "source_not_found", "upload it again")
    assert stored.finished_at is not None and stored.finished


def test_heartbeat_beats_while_the_body_runs(db: Database, make_scan: MakeScan) -> None:
    job = claim(db, make_scan(db).id, "w", stale_after=60)
    assert job is not None
    past = now() - timedelta(hours=1)
    set_row(db, job.scan.id, heartbeat_at=past)
    with heartbeat(job, interval=0.05):
        deadline = time.monotonic() + 5
        while (beat := row(db, job.scan.id).heartbeat_at) == past:
            assert time.monotonic() < deadline, "no heartbeat within 5 s"
            time.sleep(0.02)
        assert beat is not None and beat > now() - timedelta(seconds=10)
    set_row(db, job.scan.id, heartbeat_at=past)
    time.sleep(0.2)  # four intervals: a beat now would be a thread left running
    assert row(db, job.scan.id).heartbeat_at == past


def test_earlier_result_is_the_same_owners(db: Database, make_scan: MakeScan) -> None:
    key = "k" * 64
    mine = make_scan(db, owner="alice", state="succeeded", cache_key=key, finished_at=now(),
                     result_dir="scans/a")
    make_scan(db, owner="bob", state="succeeded", cache_key=key, finished_at=now(),
              result_dir="scans/b")
    make_scan(db, owner="carol", state="failed", cache_key=key, finished_at=now())
    alice_again = make_scan(db, owner="alice")
    found = earlier_result(db, alice_again, key)
    assert found is not None and found.id == mine.id
    assert earlier_result(db, make_scan(db, owner="carol"), key) is None  # bob's is not hers
    assert earlier_result(db, make_scan(db, owner="dave"), key) is None
    assert earlier_result(db, alice_again, "other") is None
    assert earlier_result(db, mine, key) is None  # never itself


# --- cancellation inside the work, and one mapping of what escapes a scan (issue 13)


def test_the_cancel_check_reads_the_database_at_most_once_a_poll(
        db: Database, make_scan: MakeScan) -> None:
    job = claim(db, make_scan(db).id, "w", stale_after=60)
    assert job is not None
    with cancellation.checked_by(job.check_cancelled):
        cancellation.check()  # running and ours: goes on
        set_row(db, job.scan.id, state="cancelled")
        cancellation.check()  # within the poll interval: no database read, goes on
        job._polled -= CANCEL_POLL
        with pytest.raises(ScanCancelled):
            cancellation.check()
    cancellation.check()  # outside the scan: nothing installed, nothing raised
    assert job.cancelled()


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, device="cpu", stage_time_limit=0)


def test_a_scan_stored_with_options_out_of_bounds_fails_invalid_config(
        db: Database, make_scan: MakeScan, tmp_path: Path) -> None:
    # a row queued before the bounds existed: refused by the worker, nothing computed or written
    scan = make_scan(db, request={"scan": {"suspect": "zoo/s", "base": "zoo/b",
                                           "fixed_lambda": 1e6, "recipe": {"epochs": 10**8}}})
    job = claim(db, scan.id, "w", stale_after=60)
    assert job is not None
    run(job, _settings(tmp_path))
    stored = row(db, scan.id)
    assert (stored.state, stored.error_code) == ("failed", "invalid_config")
    assert "fixed_lambda" in (stored.error_message or "")
    assert not (tmp_path / "scans" / scan.id).exists()


@pytest.mark.parametrize(("raised", "code"), [
    (RuntimeError("boom at /srv/secret/path"), "internal_error"),
    (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
    (MemoryError(), "limit_exceeded"),
])
def test_whatever_escapes_a_stage_becomes_a_stable_code_without_a_traceback(
        db: Database, make_scan: MakeScan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        raised: BaseException, code: str) -> None:
    def resolve(*_: object) -> None:
        raise raised

    monkeypatch.setattr(pipeline, "resolve_inputs", resolve)
    job = claim(db, make_scan(db).id, "w", stale_after=60)
    assert job is not None
    run(job, _settings(tmp_path))
    stored = row(db, job.scan.id)
    assert (stored.state, stored.error_code) == ("failed", code)
    message = stored.error_message or ""
    assert "Traceback" not in message and "/srv/secret" not in message
    if code == "internal_error":
        assert job.scan.id in message and "'resolve'" in message


def test_a_cancel_inside_the_work_stops_it_and_removes_its_outputs(
        db: Database, make_scan: MakeScan, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path)
    scan = make_scan(db)
    steps: list[int] = []

    def resolve(*_: object) -> None:  # a long loop of the library: cancelled at step 3
        out = settings.scans_dir / scan.id
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"partial")
        for step in range(1000):
            if step == 3:
                set_row(db, scan.id, state="cancelled")
                job._polled -= CANCEL_POLL
            cancellation.check()
            steps.append(step)

    monkeypatch.setattr(pipeline, "resolve_inputs", resolve)
    job = claim(db, scan.id, "w", stale_after=60)
    assert job is not None
    run(job, settings)
    assert steps == [0, 1, 2]
    assert row(db, scan.id).state == "cancelled"  # not overwritten by a failure
    assert not (settings.scans_dir / scan.id).exists()
