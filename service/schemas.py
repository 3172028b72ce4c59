"""The API's request and response bodies (they are also its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergeshield.ibvs import DEFAULT_GRID, Focus, InjectionRecipe
from mergeshield.triggers import Trigger

HUB_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$"
# a bundled dataset (with derived-task modifiers) or a hub dataset id: never a server path
DATASET = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95})?(:[a-z0-9]+)*$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Body):
    """A model on the hub (``hub`` + optional ``revision``) or an upload (``upload`` id)."""

    hub: str | None = Field(default=None, pattern=HUB_ID, examples=["org/vit-mnist-finetune"])
    revision: str | None = Field(default=None, max_length=200)
    upload: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")

    @model_validator(mode="after")
    def _one_source(self) -> ModelRef:
        if (self.hub is None) == (self.upload is None):
            raise ValueError("give exactly one of 'hub' and 'upload'")
        if self.upload is not None and self.revision is not None:
            raise ValueError("'revision' applies to hub models only")
        return self

    def label(self) -> str:
        return self.hub or f"upload:{self.upload}"


class ScanOptions(_Body):
    """How to scan: the library's ``ScanRequest`` options (see its docs for each)."""

    recipe: InjectionRecipe = Field(default_factory=InjectionRecipe)
    focus: Focus = Field(default_factory=Focus)
    lambdas: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID), max_length=64)
    budget_points: float = Field(default=2.0, ge=0, le=100)
    fixed_lambda: float | None = None
    triggers: list[Trigger] = Field(default_factory=list, max_length=32)
    user_targets: list[int | None] = Field(default_factory=list, max_length=32)
    probes: bool = True
    inversion: bool = True
    inversion_steps: int = Field(default=60, ge=1, le=10_000)
    max_eval: int | None = Field(default=1000, ge=1)
    min_asr_gap: float = Field(default=0.2, ge=0, le=1)
    seed: int = 0


class ScanCreate(_Body):
    suspect: ModelRef
    base: ModelRef
    evaluation: str | None = Field(default=None, pattern=DATASET, examples=["mnist5k"])
    evaluation_revision: str | None = Field(default=None, max_length=200)
    injection_data: str | None = Field(default=None, pattern=DATASET)
    options: ScanOptions = Field(default_factory=ScanOptions)
    device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: big models to the gpu queue
    force: bool = False  # rescan even if an identical scan already succeeded


class ScanOut(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str | None
    percent: float
    suspect: str
    base: str
    queue: str
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    verdict: str | None
    severity: str | None
    cached_from: str | None
    error: dict[str, Any] | None
    summary: dict[str, Any] | None
    links: dict[str, str]


class ScanPage(BaseModel):
    items: list[ScanOut]
    total: int
    limit: int
    offset: int


class UploadOut(BaseModel):
    id: str
    filename: str
    kind: str
    size: int
    sha256: str
    created_at: datetime


class KeyCreate(_Body):
    name: str = Field(min_length=1, max_length=200)
    admin: bool = False


class KeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None
    key: str | None = None  # the secret, shown once at creation
