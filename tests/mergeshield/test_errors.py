"""The one mapping of an escaped exception to a stable error (errors.as_mergeshield_error)."""

from __future__ import annotations

import errno

import pytest
import torch

from mergeshield.errors import (
    CorruptCheckpointError,
    GpuMemoryError,
    InternalError,
    LimitError,
    StorageFullError,
    as_mergeshield_error,
)


def test_ours_stay_as_they_are() -> None:
    exc = CorruptCheckpointError("x")
    assert as_mergeshield_error(exc) is exc


@pytest.mark.parametrize(("exc", "kind", "code"), [
    (OSError(errno.ENOSPC, "No space left on device"), StorageFullError, "disk_full"),
    (MemoryError(), LimitError, "limit_exceeded"),
    (torch.OutOfMemoryError("CUDA out of memory"), GpuMemoryError, "insufficient_gpu_memory"),
    (KeyError("/srv/uploads/secret-path"), InternalError, "internal_error"),
    (OSError(errno.EACCES, "Permission denied", "/srv/x"), InternalError, "internal_error"),
])
def test_escaped_exceptions_get_a_stable_code_and_no_input_text(
        exc: BaseException, kind: type, code: str) -> None:
    mapped = as_mergeshield_error(exc)
    assert isinstance(mapped, kind)
    assert mapped.code == code
    assert "/srv" not in mapped.message  # the exception's text (a path, a value) stays out
