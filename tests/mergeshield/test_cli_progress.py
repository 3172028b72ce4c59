"""What a CLI scan prints while it runs: a bar on a terminal, lines (or JSON lines) when piped,
at least every few seconds even inside a long stage."""

from __future__ import annotations

import io
import json
import re
import time

from mergeshield.cli_progress import ProgressPrinter
from mergeshield.pipeline import percent


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_a_line_per_stage_and_every_few_seconds_within_one() -> None:
    out, clock = io.StringIO(), Clock()
    with ProgressPrinter(out, every=5.0, clock=clock) as p:
        p("resolve", 0.0)
        clock.now = 1.0
        p("task_vector", 0.0)
        p("task_vector", 0.5)  # same stage, 0 s later: nothing new
        clock.now = 7.0
        p("inject-clean", 0.5)
        clock.now = 8.0
        p("inject-clean", 0.9)
    lines = out.getvalue().splitlines()
    assert lines == [f"[{percent('resolve', 0):5.1f}%] resolve (0 s)",
                     f"[{percent('task_vector', 0):5.1f}%] task_vector (1 s)",
                     f"[{percent('inject-clean', 0.5):5.1f}%] inject-clean (7 s)"]


def test_the_ticker_speaks_when_the_library_is_silent() -> None:
    """A stage that reports nothing (an inversion, a sweep) still prints every ``every``."""
    out = io.StringIO()
    with ProgressPrinter(out, every=0.05) as p:
        p("invert_triggers", 0.0)
        time.sleep(0.4)
    ticks = out.getvalue().splitlines()
    assert len(ticks) >= 3 and all("invert_triggers" in t for t in ticks)


def test_json_lines_and_a_percent_that_never_goes_back() -> None:
    out, clock = io.StringIO(), Clock()
    with ProgressPrinter(out, style="json", every=1.0, clock=clock) as p:
        for stage, fraction in (("unlearn", 0.9), ("unlearn", 0.1), ("some-new-stage", 0.0)):
            clock.now += 2
            p(stage, fraction)
    rows = [json.loads(line)["progress"] for line in out.getvalue().splitlines()]
    assert [r["stage"] for r in rows] == ["unlearn", "unlearn", "some-new-stage"]
    assert [r["percent"] for r in rows] == [percent("unlearn", 0.9)] * 3  # a round restarted
    assert [r["elapsed_s"] for r in rows] == [2.0, 4.0, 6.0]


def test_on_a_terminal_one_bar_for_the_whole_scan() -> None:
    out = Terminal()
    with ProgressPrinter(out) as p:
        assert p.style == "bar"
        p("sweep", 0.5)
    assert re.search(r"sweep\s+65%\|", out.getvalue())


def test_a_zoo_build_shows_each_stages_own_percent() -> None:
    out = io.StringIO()
    with ProgressPrinter(out, whole_scan=False, clock=Clock()) as p:  # stage changes print
        p("pretrain", 0.5)
        p("fine-tune vit-mnist", 0.25)
    assert [line.split("]")[0] for line in out.getvalue().splitlines()] == ["[ 50.0%", "[ 25.0%"]
