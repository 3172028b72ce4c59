"""The one error tree of MergeShield.

Every error the library raises on purpose is a ``MergeShieldError`` with a stable ``code`` (used by
the CLI's exit codes, the service's JSON error body and the report's ``incomplete`` reasons) and a
``details`` value that says what exactly was wrong. Messages say what to do next.

Anything else that escapes is turned into one of these by :func:`as_mergeshield_error`, the one
mapping every front end (CLI, worker) uses: no traceback ever reaches a user, and
``internal_error`` is left for true bugs.

    MergeShieldError                       code
    ├── InputError (ValueError)            invalid_input         the caller gave something unusable
    │   ├── SourceNotFoundError            source_not_found      no such path/repo/revision/file
    │   │   │ (also FileNotFoundError)
    │   │   └── NothingScannableError      nothing_scannable     the source holds no model weights
    │   ├── UnsafeFormatError              unsafe_format         would need pickle or remote code
    │   │   └── UnsafeFileError            unsafe_file           a link out of the folder, a FIFO,
    │   │                                                        a device or socket as a model file
    │   ├── UnsafeArchiveError             unsafe_archive        zip/tar with escapes, links, bombs
    │   ├── CorruptCheckpointError         corrupt_checkpoint    bad safetensors/index/config
    │   ├── InvalidWeightsError            invalid_weights       NaN or inf in a weight tensor
    │   ├── IncompatibleModelsError        incompatible_models   keys / shapes / dtypes differ
    │   ├── UnsupportedModelError          unsupported_model     no adapter can run this model
    │   │   ├── UnsupportedTensorError     unsupported_tensor    complex/quantized/uint16/sparse
    │   │   └── ModelRunError              model_failed          the model crashed in a forward pass
    │   ├── DatasetError                   invalid_dataset       unreadable or unusable dataset
    │   ├── CallbackUrlError               invalid_callback_url  not http(s), or a private address
    │   └── ConfigError                    invalid_config        a bad option or recipe
    ├── HubError (ConnectionError)         hub_unavailable       the hub failed or is offline
    ├── StorageFullError (OSError)         disk_full             no room left to write
    │   └── InsufficientStorageError       insufficient_storage  under min_free_bytes left (507)
    ├── LimitError                         limit_exceeded        a scan outgrew a limit set for it
    │   ├── StageTimeLimitError            stage_time_limit      one stage ran past its time limit
    │   │   (also TimeoutError)
    │   ├── GpuMemoryError                 insufficient_gpu_memory  too little free GPU memory
    │   └── ModelTooLargeError             model_too_large       more parameters than max_parameters
    ├── InternalError                      internal_error        a bug of MergeShield (never input)
    └── ServiceError                                             raised by the service's edges
        ├── AuthenticationError            unauthorized          no or an unknown API key (401)
        │   └── WebhookSecretError         invalid_webhook_secret  X-Webhook-Secret missing/wrong
        ├── PermissionDeniedError          forbidden             the key may not do this (403)
        │   └── WebhooksDisabledError      webhooks_disabled     no webhook secret configured
        ├── NotFoundError (LookupError)    not_found             no such scan/upload/key (404)
        ├── ConflictError                  conflict              not in a state for this (409)
        ├── IdempotencyKeyReusedError      idempotency_key_reused  the key named another body (422)
        ├── PayloadTooLargeError           payload_too_large     over the upload limit (413)
        ├── QuotaExceededError             quota_exceeded        a key's concurrent scans (429)
        │   └── StorageQuotaError          quota_exceeded        a key's stored bytes (413)
        ├── ArtifactsExpiredError          artifacts_expired     removed by retention (410)
        └── RequestTimeoutError            request_timeout       an upload's body stalled (408)
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any


class MergeShieldError(Exception):
    """Base class: a message for people, a stable ``code`` for programs, ``details`` for both."""

    code = "error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape used everywhere: ``{"code", "message", "details"}``."""
        return {"code": self.code, "message": self.message, "details": self.details}


class InputError(MergeShieldError, ValueError):
    code = "invalid_input"


class SourceNotFoundError(InputError, FileNotFoundError):
    code = "source_not_found"


class NothingScannableError(SourceNotFoundError):
    code = "nothing_scannable"


class UnsafeFormatError(InputError):
    code = "unsafe_format"


class UnsafeArchiveError(InputError):
    code = "unsafe_archive"


class UnsafeFileError(UnsafeFormatError):
    code = "unsafe_file"


class CorruptCheckpointError(InputError):
    code = "corrupt_checkpoint"


class InvalidWeightsError(InputError):
    code = "invalid_weights"


class IncompatibleModelsError(InputError):
    code = "incompatible_models"


class UnsupportedModelError(InputError):
    code = "unsupported_model"


class UnsupportedTensorError(UnsupportedModelError):
    code = "unsupported_tensor"


class ModelRunError(UnsupportedModelError):
    code = "model_failed"


class DatasetError(InputError):
    code = "invalid_dataset"


class CallbackUrlError(InputError):
    code = "invalid_callback_url"


class ConfigError(InputError):
    code = "invalid_config"

    @classmethod
    def listing(cls, prefix: str, exc: Any, what: str = "option") -> ConfigError:
        """The problems of a pydantic ``ValidationError`` ``exc``: each as {what: where,
        "problem": why} in the details, the first five in the message after ``prefix``."""
        problems = [{what: ".".join(str(p) for p in e["loc"]), "problem": e["msg"]}
                    for e in exc.errors(include_url=False, include_input=False)]
        listed = "; ".join(f"{p[what]}: {p['problem']}" for p in problems[:5])
        return cls(f"{prefix}: {listed}", details=problems)


def mismatches(details: Mapping[str, list[Any]]) -> str:
    """What differs between two tensor layouts, for a message: per kind (``missing``,
    ``shape``…) its count and up to three names (an item is a name, or a dict with ``name``)."""
    parts = []
    for label, items in details.items():
        if items:
            names = [i["name"] if isinstance(i, dict) else i for i in items[:3]]
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{len(items)} {label}: {', '.join(names)}{more}")
    return "; ".join(parts)


class HubError(MergeShieldError, ConnectionError):
    code = "hub_unavailable"


class StorageFullError(MergeShieldError, OSError):
    code = "disk_full"
    ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # no space, quota, size limit

    @classmethod
    def of(cls, exc: OSError, what: str) -> StorageFullError | None:
        """Ours for an ``OSError`` that means "no room to write ``what``"; None for any other."""
        if exc.errno not in cls.ERRNOS:
            return None
        return cls(f"no room to write {what} ({os.strerror(exc.errno)}): free disk space or "
                   "raise the limit, then retry", details={"errno": errno.errorcode[exc.errno]})


class InsufficientStorageError(StorageFullError):
    code = "insufficient_storage"


class LimitError(MergeShieldError):
    code = "limit_exceeded"


class StageTimeLimitError(LimitError, TimeoutError):
    code = "stage_time_limit"


class GpuMemoryError(LimitError):
    code = "insufficient_gpu_memory"


class ModelTooLargeError(LimitError):
    code = "model_too_large"


class InternalError(MergeShieldError):
    code = "internal_error"


class ServiceError(MergeShieldError):
    code = "service_error"


class AuthenticationError(ServiceError):
    code = "unauthorized"


class WebhookSecretError(AuthenticationError):
    code = "invalid_webhook_secret"


class PermissionDeniedError(ServiceError):
    code = "forbidden"


class WebhooksDisabledError(PermissionDeniedError):
    code = "webhooks_disabled"


class NotFoundError(ServiceError, LookupError):
    code = "not_found"


class ConflictError(ServiceError):
    code = "conflict"


class IdempotencyKeyReusedError(ServiceError):
    code = "idempotency_key_reused"


class PayloadTooLargeError(ServiceError):
    code = "payload_too_large"


class QuotaExceededError(ServiceError):
    code = "quota_exceeded"


class StorageQuotaError(QuotaExceededError):
    pass


class ArtifactsExpiredError(ServiceError):
    code = "artifacts_expired"


class RequestTimeoutError(ServiceError):
    code = "request_timeout"


def as_mergeshield_error(exc: BaseException) -> MergeShieldError:
    """The stable error for anything that escaped a stage: ours as is; a full disk, memory
    exhaustion or a CUDA out-of-memory as their own; any other exception is a bug of ours
    (``internal_error``), named by its type only, so no path or value of the input leaks."""
    if isinstance(exc, MergeShieldError):
        return exc
    if isinstance(exc, OSError) and (full := StorageFullError.of(exc, "the output")):
        return full
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA), no torch here
        return GpuMemoryError("the GPU ran out of memory; run on the CPU or a larger GPU",
                              details={"reason": type(exc).__name__})
    if isinstance(exc, MemoryError):
        return LimitError("the scan ran out of memory; give it more memory or scan a smaller "
                          "model", details={"reason": "MemoryError"})
    return InternalError(f"an internal error occurred ({type(exc).__name__}); this is a bug of "
                         "MergeShield, please report it with the command you ran",
                         details={"reason": type(exc).__name__})
