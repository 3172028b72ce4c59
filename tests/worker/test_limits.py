"""limits.py: per-stage time limits and the GPU memory guard's decision (no GPU here: the CUDA
query itself is not run; the decision is a pure function of the numbers it would get)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from mergeshield.errors import GpuMemoryError, StageTimeLimitError
from worker import limits
from worker.db import Database, Scan
from worker.jobs import claim
from worker.limits import StageClock, gpu_decision, guard_device

GiB = 1024**3


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(limits, "monotonic", fake)
    return fake


def test_a_stage_within_its_limit_goes_on(clock_time: FakeTime) -> None:
    with StageClock(10.0, {"sweep": 100.0}) as clock:
        clock.observe("resolve")
        clock_time.now += 9
        clock.observe("resolve")
        clock.observe("sweep")
        clock_time.now += 99
        clock.observe("sweep")


def test_a_stage_past_its_limit_fails_naming_it(clock_time: FakeTime) -> None:
    with StageClock(0.0, {"measure_suspect": 5.0}) as clock:
        clock.observe("resolve")
        clock_time.now += 1000  # no limit for resolve
        clock.observe("measure_suspect")
        clock_time.now += 6
        with pytest.raises(StageTimeLimitError) as info:
            clock.observe("measure_suspect")
    assert info.value.code == "stage_time_limit"
    assert "'measure_suspect'" in info.value.message and "5 s" in info.value.message
    assert info.value.details == {"stage": "measure_suspect", "limit": 5.0}


def test_a_merges_scan_stages_are_limited_by_their_names(clock_time: FakeTime) -> None:
    with StageClock(0.0, {"sweep": 5.0}) as clock:
        clock.observe("scan 1/3: sweep")
        clock_time.now += 4
        clock.observe("scan 2/3: sweep")  # the next scan's sweep: a clock of its own
        clock_time.now += 4
        clock.observe("choose_scale")  # the plan's own stages: no limit here
        clock_time.now += 1000
        clock.observe("scan 3/3: sweep")
        clock_time.now += 6
        with pytest.raises(StageTimeLimitError) as info:
            clock.observe("scan 3/3: sweep")
    assert info.value.details == {"stage": "scan 3/3: sweep", "limit": 5.0}


def test_a_silent_stage_is_judged_when_the_next_one_starts(clock_time: FakeTime) -> None:
    with StageClock(5.0) as clock:
        clock.observe("write_checkpoint")
        clock_time.now += 6
        with pytest.raises(StageTimeLimitError, match="'write_checkpoint'"):
            clock.observe("report")


def test_the_alarm_interrupts_a_stage_that_reports_nothing() -> None:
    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(StageTimeLimitError, match="'resolve'"), StageClock(0.05) as clock:
        clock.observe("resolve")
        time.sleep(30)  # a hung download: the alarm ends it
    assert signal.getsignal(signal.SIGALRM) == before  # given back, and disarmed
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_jobs_progress_report_checks_the_clock(db: Database, make_scan: Callable[..., Scan],
                                                clock_time: FakeTime) -> None:
    make_scan(db, id="s1")
    job = claim(db, "s1", "w1", stale_after=60)
    assert job is not None
    with StageClock(5.0) as job.clock:
        job.progress("sweep", 0.0)
        clock_time.now += 6
        with pytest.raises(StageTimeLimitError, match="'sweep'"):
            job.progress("sweep", 0.5)


@pytest.mark.parametrize(("requested", "free", "expected"), [
    ("auto", 8 * GiB, "cuda"),  # 4 × 2 GiB fits exactly
    ("gpu", 8 * GiB, "cuda"),
    ("auto", 8 * GiB - 1, "cpu"),  # falls back
    ("cpu", 1, "cpu"),
])
def test_gpu_decision(requested: str, free: int, expected: str) -> None:
    assert gpu_decision(requested, free, 2 * GiB, 4.0) == expected


def test_a_gpu_scan_without_room_is_refused_with_the_numbers() -> None:
    with pytest.raises(GpuMemoryError) as info:
        gpu_decision("gpu", 3 * GiB, 2 * GiB, 4.0)
    assert info.value.code == "insufficient_gpu_memory"
    assert info.value.details == {"free": 3 * GiB, "needed": 8 * GiB,
                                  "checkpoint_bytes": 2 * GiB}


def test_the_cpu_is_never_guarded() -> None:
    assert guard_device("cpu", "gpu", 10**15, 4.0) == "cpu"  # CUDA is not asked
