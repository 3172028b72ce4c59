"""What a CLI scan prints on stderr while it runs.

- On a terminal: one bar for the whole scan, with the stage and tqdm's elapsed time and ETA.
- Piped (CI, ``nohup``, a log file): a line when a stage starts, and at least every ``every``
  seconds while it runs (a ticker thread), so a long stage is never silent.
- ``--format json``: the same lines as JSON objects, one per line.

The library reports ``(stage, fraction of that stage)``; ``pipeline.percent`` places it on the
whole scan, and that percent never goes back (a repair round restarts its fine-tune's fraction).
``whole_scan=False`` (a zoo build, the paper bench: stages the scale does not know) shows each
stage's own percent.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Literal

from tqdm import tqdm

from mergeshield.pipeline import percent

Style = Literal["bar", "lines", "json"]


class ProgressPrinter:
    """A ``ScanContext.progress`` callback that prints; ``close()`` (or ``with``) when done."""

    def __init__(self, stream: IO[str] | None = None, *, style: Style | None = None,
                 every: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 whole_scan: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.style: Style = style or ("bar" if self.stream.isatty() else "lines")
        self.every, self.clock, self.whole_scan = every, clock, whole_scan
        self.started = self.printed = clock()
        self.stage, self.percent = "", 0.0
        self.bar: tqdm[Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.style != "bar":
            self._ticker = threading.Thread(target=self._tick, daemon=True,
                                            name="progress-ticker")
            self._ticker.start()

    def __call__(self, stage: str, fraction: float) -> None:
        with self._lock:
            new_stage = stage != self.stage
            self.stage = stage
            if not self.whole_scan:
                self.percent = round(100 * fraction, 1)
            elif (placed := percent(stage, fraction)) is not None:  # unknown stage: stays
                self.percent = max(self.percent, placed)
            if self.style == "bar":
                self._draw()
            elif new_stage or self.clock() - self.printed >= self.every:
                self._line()

    def _draw(self) -> None:
        if self.bar is None:
            self.bar = tqdm(total=100, file=self.stream, leave=False,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| "
                                       "[{elapsed}<{remaining}]")
        self.bar.set_description_str(self.stage, refresh=False)
        self.bar.n = self.percent
        self.bar.refresh()

    def _line(self) -> None:
        now = self.clock()
        elapsed = now - self.started
        if self.style == "json":
            text = json.dumps({"progress": {"stage": self.stage, "percent": self.percent,
                                            "elapsed_s": round(elapsed, 1)}})
        else:
            text = f"[{self.percent:5.1f}%] {self.stage} ({elapsed:.0f} s)"
        print(text, file=self.stream, flush=True)
        self.printed = now

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, max(self.every, 0.05))):
            with self._lock:
                if self.stage and self.clock() - self.printed >= self.every:
                    self._line()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        with self._lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def __enter__(self) -> ProgressPrinter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
