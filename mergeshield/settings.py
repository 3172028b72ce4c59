"""The one settings class, read at the edges (CLI, worker, service), never inside the library.

Environment variables are prefixed ``MERGESHIELD_``; the hub's standard ``HF_TOKEN`` and
``HF_ENDPOINT`` are honoured as well. Algorithm parameters are never settings: they are arguments.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache() -> Path:
    return Path.home() / ".cache" / "mergeshield"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGESHIELD_", env_file=".env", extra="ignore")

    # hub access: a token for private repos (never logged), an endpoint for mirrors / private hubs
    hf_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("MERGESHIELD_HF_TOKEN", "HF_TOKEN")
    )
    hf_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("MERGESHIELD_HF_ENDPOINT", "HF_ENDPOINT")
    )
    # hub downloads, converted .bin files and the injection-BV cache
    cache_dir: Path = Field(default_factory=_default_cache)
    # "cuda", "cpu" or None: CUDA when present
    device: str | None = None

    def token(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token else None
