"""The one settings class, read at the edges (CLI, worker, service), never inside the library.

Environment variables are prefixed ``MERGESHIELD_``; the standard ``HF_TOKEN``, ``HF_ENDPOINT``,
``REDIS_URL`` and ``DATABASE_URL`` are honoured as well. Every field is listed, with its default,
in ``.env.example``. Algorithm parameters are never settings: they are arguments.

Without ``REDIS_URL`` / ``DATABASE_URL`` the service runs on the embedded default: Celery on its
filesystem transport and SQLite, both under ``data_dir``. With them, the same code runs as an API
and any number of workers on Redis and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache() -> Path:
    return Path.home() / ".cache" / "mergeshield"


def _default_data() -> Path:
    return Path.home() / ".local" / "share" / "mergeshield"


def _env(name: str) -> AliasChoices:
    """Accept ``MERGESHIELD_<NAME>`` and the standard ``<NAME>``."""
    return AliasChoices(f"MERGESHIELD_{name}", name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGESHIELD_", env_file=".env", extra="ignore")

    # --- hub access: a token for private repos (never logged), an endpoint for mirrors
    hf_token: SecretStr | None = Field(default=None, validation_alias=_env("HF_TOKEN"))
    hf_endpoint: str | None = Field(default=None, validation_alias=_env("HF_ENDPOINT"))
    # hub downloads, converted .bin files and the injection-BV cache
    cache_dir: Path = Field(default_factory=_default_cache)
    # "cuda", "cpu" or None: CUDA when present
    device: str | None = None

    # --- service and workers
    # SQLite database, filesystem broker, uploads and scan artifacts (shared by API and workers)
    data_dir: Path = Field(default_factory=_default_data)
    # Redis broker; None = Celery's filesystem transport under data_dir (one machine)
    redis_url: str | None = Field(default=None, validation_alias=_env("REDIS_URL"))
    # SQLAlchemy URL (postgresql://... uses psycopg 3); None = SQLite under data_dir
    database_url: str | None = Field(default=None, validation_alias=_env("DATABASE_URL"))
    # uploads larger than this are refused with 413 while they stream in
    max_upload_bytes: int = 20 * 1024**3
    # archives: total unpacked size and member count
    max_unpacked_bytes: int = 40 * 1024**3
    max_archive_files: int = 10_000
    # a scan raises SoftTimeLimitExceeded after this many seconds and is killed after hard
    scan_soft_time_limit: int = 6 * 3600
    scan_hard_time_limit: int = 6 * 3600 + 300
    # per-stage limit in seconds for every stage, and per-stage overrides by stage name (e.g.
    # {"resolve": 1800}; a merge's "scan 2/3: sweep" is a "sweep"); the worker fails a scan
    # whose stage runs longer; 0 = no limit
    stage_time_limit: float = 0.0
    stage_time_limits: dict[str, float] = Field(default_factory=dict)
    # refuse a hub download, an archive's unpacking or an upload's bytes that would leave less
    # than this much free disk (507 insufficient_storage)
    min_free_bytes: int = 1024**3
    # an upload whose body sends no byte for this many seconds is dropped (408)
    upload_idle_timeout: float = 30.0
    # per API key (admin keys are exempt): scans queued or running at once (429) and bytes of
    # uploads stored (413); 0 = no limit
    key_max_active_scans: int = 20
    key_max_stored_bytes: int = 100 * 1024**3
    # retention, in seconds: a finished scan's report and cleaned checkpoint, and an upload no
    # queued or running scan uses; the row and the report summary stay. 0 = keep forever
    artifact_retention: float = 30 * 86400.0
    upload_retention: float = 7 * 86400.0
    # how often the API removes what is past its retention (``mergeshield cleanup`` does one pass)
    cleanup_interval: float = 3600.0
    # CUDA only when its free memory is at least this many times the two checkpoints' bytes;
    # else a scan with device "auto" runs on the CPU and one with device "gpu" fails
    gpu_memory_factor: float = 4.0
    # uploads at least this large go to the "gpu" queue when the scan's device is "auto"
    gpu_route_min_bytes: int = 1024**3
    # a running scan whose worker has not written a heartbeat for this long is re-enqueued
    heartbeat_interval: float = 5.0
    stale_after: float = 60.0
    # how often the API's reconciler compares the database with the broker
    reconcile_interval: float = 30.0
    # a scan is tried this many times (worker crashes) before it fails for good
    max_attempts: int = 3
    # `serve` stopping (SIGTERM/SIGINT): seconds its workers get to stop before they are killed
    # (a scan still running is re-queued when the service is back)
    worker_stop_timeout: float = 10.0
    # admin key (sees every scan, creates keys); other keys live hashed in the database
    admin_key: SecretStr | None = None
    # no authentication at all: only for local use (``mergeshield serve`` without --auth)
    auth_disabled: bool = False
    # JSON logs (one object per line) instead of plain text
    json_logs: bool = True

    # --- webhooks (service/hub_events.py, worker/callbacks.py)
    # the Hub sends it as X-Webhook-Secret; None (and no watch secret) = every delivery refused
    webhook_secret: SecretStr | None = None
    # result callbacks: tries before a delivery is dead; the first retry waits callback_backoff
    # seconds and each later one twice as long as the one before (capped at callback_backoff_max)
    callback_max_attempts: int = 8
    callback_backoff: float = 10.0
    callback_backoff_max: float = 3600.0
    # seconds to wait for a callback receiver's answer
    callback_timeout: float = 10.0
    # how often the API looks for callbacks to send
    callback_poll_interval: float = 1.0
    # allow callback URLs on loopback/private/link-local addresses (SSRF guard off): tests only
    callback_allow_private: bool = False

    def token(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token else None

    def broker(self) -> str:
        return self.redis_url or "filesystem://"

    def database(self) -> str:
        url = self.database_url or f"sqlite:///{self.data_dir / 'mergeshield.db'}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):  # SQLAlchemy's default driver is psycopg2; we ship psycopg 3
                return "postgresql+psycopg://" + url[len(prefix):]
        return url

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def scans_dir(self) -> Path:
        return self.data_dir / "scans"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"
