"""Limits a worker puts on one scan, at the edge (the library only reports what it does).

* Per-stage time limits: :class:`StageClock` follows the stages the pipeline reports through its
  progress callback (the names ``GET /v1/scans/{id}`` shows as ``stage``). A stage that runs past
  its limit fails the scan with ``stage_time_limit``, naming the stage. On the main thread (a
  prefork worker's task) a SIGALRM interrupts even a stage that reports nothing while it runs,
  e.g. a hub download; elsewhere the limit is checked at each report.
* The GPU memory guard: :func:`gpu_decision` says, from CUDA's free memory and the checkpoints'
  size, whether a scan runs on CUDA, falls back to the CPU (device "auto") or is refused.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping
from time import monotonic
from types import FrameType, TracebackType
from typing import Any

from mergeshield.errors import GpuMemoryError, StageTimeLimitError


class StageClock:
    """Times each reported stage against ``per_stage.get(stage, default)`` seconds (0: none)."""

    def __init__(self, default: float = 0.0, per_stage: Mapping[str, float] | None = None
                 ) -> None:
        self.default, self.per_stage = default, dict(per_stage or {})
        self.stage: str | None = None
        self.started = 0.0
        self._alarm = (hasattr(signal, "setitimer")
                       and threading.current_thread() is threading.main_thread())
        self._previous: Any = None

    def limit(self, stage: str) -> float:
        """A stage's limit by its name; a merge's "scan 2/3: sweep" is its scan's "sweep"."""
        return self.per_stage.get(stage.rsplit(": ", 1)[-1], self.default)

    def observe(self, stage: str) -> None:
        """A progress report: a new stage starts its clock; any report checks the running one."""
        self._check()  # a stage without reports of its own is judged when the next one starts
        if stage != self.stage:
            self.stage, self.started = stage, monotonic()
            self._arm(self.limit(stage))

    def error(self) -> StageTimeLimitError:
        stage = self.stage or "?"
        limit = self.limit(stage)
        return StageTimeLimitError(
            f"the stage {stage!r} ran longer than its limit of {limit:g} s and was "
            "stopped; retry with a smaller scan (fewer evaluation images, no inversion) or ask "
            "for a larger limit (MERGESHIELD_STAGE_TIME_LIMITS)",
            details={"stage": stage, "limit": limit})

    def _check(self) -> None:
        if self.stage is not None and 0 < self.limit(self.stage) < monotonic() - self.started:
            raise self.error()

    def _arm(self, seconds: float) -> None:
        if not self._alarm:
            return
        if self._previous is None:
            self._previous = signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.0))  # 0 disarms

    def _on_alarm(self, _signum: int, _frame: FrameType | None) -> None:
        raise self.error()

    def __enter__(self) -> StageClock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Disarm and give SIGALRM back, however the scan ended."""
        if self._alarm and self._previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self._previous = None


def gpu_decision(requested: str, free_bytes: int, checkpoint_bytes: int, factor: float) -> str:
    """"cuda" when ``free_bytes`` holds ``factor`` × ``checkpoint_bytes`` (the two checkpoints,
    BV_inj, the models being trained and their activations); otherwise "cpu" for a scan whose
    requested device is "auto" (or "cpu"), and GpuMemoryError for one that asked for "gpu"."""
    need = int(factor * checkpoint_bytes)
    if free_bytes >= need:
        return "cuda"
    if requested != "gpu":
        return "cpu"
    raise GpuMemoryError(
        f"the GPU has {free_bytes} bytes free and this scan needs about {need} "
        f"({factor:g} × {checkpoint_bytes} bytes of checkpoints); retry when the GPU is less "
        "busy, or submit with device \"auto\" or \"cpu\"",
        details={"free": free_bytes, "needed": need, "checkpoint_bytes": checkpoint_bytes})


def guard_device(device: str, requested: str, checkpoint_bytes: int, factor: float) -> str:
    """``device``, checked against CUDA's free memory when it is CUDA (see gpu_decision)."""
    if not device.startswith("cuda"):
        return device
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return device if gpu_decision(requested, free, checkpoint_bytes, factor) == "cuda" else "cpu"
