"""The API's request and response bodies (they are also its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from mergeshield.data import check_dataset_name
from mergeshield.errors import SourceNotFoundError
from mergeshield.ibvs import DEFAULT_GRID, Focus, InjectionRecipe
from mergeshield.merge_plan_schema import MAX_PLAN_BYTES, PlanReport
from mergeshield.options import (
    MAX_LIST,
    MAX_TRIGGERS,
    ClassIndex,
    EvalImages,
    Fraction,
    ImageSide,
    InversionSteps,
    Lambda,
    Points,
    Seed,
)
from mergeshield.report import RateModel
from mergeshield.triggers import Trigger
from mergeshield.unlearning import UnlearnConfig

HUB_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$"
# a bundled dataset (with derived-task modifiers) or a hub dataset id: never a server path
DATASET = (r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95})?"
           r"(:[a-z0-9]+(=[0-9]{1,6}(-[0-9]{1,6})?(,[0-9]{1,6}(-[0-9]{1,6})?){0,63})?)*$")


def _known_dataset(name: str | None) -> str | None:
    """A bundled or hub dataset name (with valid modifiers): an unknown one is a 422 now, not
    a scan that fails in a worker later (whether a hub dataset exists is the worker's check)."""
    if name is not None:
        try:
            check_dataset_name(name)
        except SourceNotFoundError as exc:
            raise ValueError(exc.message) from None
    return name


KnownDataset = Annotated[str, AfterValidator(_known_dataset)]


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
    """How to scan: the library's ``ScanRequest`` options (see its docs for each), with the
    same bounds (``mergeshield.options``): a value outside them is a 422 before anything runs."""

    recipe: InjectionRecipe = Field(default_factory=InjectionRecipe)
    focus: Focus = Field(default_factory=Focus)
    unlearning: UnlearnConfig = Field(default_factory=UnlearnConfig)  # after IBVS, on a finding
    lambdas: list[Lambda] = Field(default_factory=lambda: list(DEFAULT_GRID), min_length=1,
                                  max_length=MAX_LIST)
    budget_points: Points = 2.0
    fixed_lambda: Lambda | None = None
    triggers: list[Trigger] = Field(default_factory=list, max_length=MAX_TRIGGERS)
    user_targets: list[ClassIndex | None] = Field(default_factory=list, max_length=MAX_TRIGGERS)
    probes: bool = True
    inversion: bool = True
    inversion_steps: InversionSteps = 60
    max_eval: EvalImages | None = 1000
    image_size: ImageSide | None = None  # every evaluation image resized to this side
    min_asr_gap: Fraction = 0.2
    seed: Seed = 0

    @field_validator("focus")
    @classmethod
    def _finite_keep(cls, focus: Focus) -> Focus:
        if not 0 < focus.keep <= 1:  # also refuses NaN
            raise ValueError("focus.keep must be a fraction in (0, 1]")
        return focus


class ScanCreate(_Body):
    suspect: ModelRef
    base: ModelRef
    evaluation: KnownDataset | None = Field(default=None, pattern=DATASET, examples=["mnist5k"])
    evaluation_revision: str | None = Field(default=None, max_length=200)
    injection_data: KnownDataset | None = Field(default=None, pattern=DATASET)
    options: ScanOptions = Field(default_factory=ScanOptions)
    device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: big models to the gpu queue
    force: bool = False  # rescan even if an identical scan already succeeded
    # POST the result here when the scan ends, signed per Standard Webhooks (see /v1/webhooks)
    callback_url: str | None = Field(default=None, max_length=2000)


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
    # set once retention removed the report files and the cleaned checkpoint (they answer 410)
    artifacts_expired_at: datetime | None = None
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


class UsageOut(BaseModel):
    key: str  # the key's id ("admin" for the settings' admin key)
    admin: bool  # admin keys are exempt from quotas
    active_scans: int  # queued or running
    max_active_scans: int | None  # None: no limit
    stored_bytes: int  # the key's uploads
    uploads: int
    max_stored_bytes: int | None


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


# --- webhooks: watches for the Hub's webhook, callback endpoints, deliveries both ways


class WatchScan(_Body):
    """What a watch scans each new commit with: a ``ScanCreate`` without its suspect."""

    base: ModelRef
    evaluation: KnownDataset | None = Field(default=None, pattern=DATASET)
    evaluation_revision: str | None = Field(default=None, max_length=200)
    injection_data: KnownDataset | None = Field(default=None, pattern=DATASET)
    options: ScanOptions = Field(default_factory=ScanOptions)
    device: Literal["auto", "gpu", "cpu"] = "auto"
    force: bool = False


class WatchCreate(_Body):
    """Scan every new commit on ``main`` of a model repo (``repo``) or of every model repo whose
    id starts with ``repo`` (``prefix: true``, e.g. ``"my-org/"``). Or, with ``merge`` (a plan
    as ``POST /v1/merges`` takes it, hub ids only) instead of ``repo`` and ``scan``: re-run the
    plan as a merge when a new ``main`` commit of one of its models or its base arrives, each
    entry of that repo named without a revision (or at ``@main``) pinned at the commit
    (``org/name@<sha>``); an entry at another revision (a commit sha, a tag) stays there."""

    repo: str | None = Field(default=None, min_length=1, max_length=200,
                             examples=["my-org/vit-finetune"])
    prefix: bool = False
    scan: WatchScan | None = None
    merge: Annotated[str, Field(max_length=MAX_PLAN_BYTES)] | dict[str, Any] | None = None
    callback_url: str | None = Field(default=None, max_length=2000)  # each scan's result
    # open a discussion with each succeeded scan's verdict on the scanned repo (HF_TOKEN writes)
    open_discussion: bool = False
    # a Hub webhook of this watch's own may send this instead of the global webhook secret
    secret: str | None = Field(default=None, min_length=16, max_length=200)
    rate_limit: int = Field(default=20, ge=1, le=100_000)  # scans per window, at most
    rate_window: int = Field(default=3600, ge=1, le=30 * 86400)  # seconds


class WatchOut(BaseModel):
    id: str
    repo: str  # a plan's watch: the hub repos whose new commits re-run it, comma-separated
    prefix: bool
    scan: dict[str, Any] | None  # None for a plan's watch
    merge: dict[str, Any] | None = None  # the plan, as checked
    last_merge: str | None = None  # a plan's watch: the newest merge a commit re-ran, its id
    callback_url: str | None
    open_discussion: bool
    has_secret: bool  # the secret itself is never shown again
    rate_limit: int
    rate_window: int
    created_at: datetime


class EndpointCreate(_Body):
    url: str = Field(min_length=1, max_length=2000, examples=["https://ci.example.com/hooks"])


class EndpointRotate(_Body):
    # keep the previous secret valid beside the new one (both sign) until the next rotation
    keep_previous: bool = True


class EndpointOut(BaseModel):
    """A callback endpoint. ``secrets`` (``whsec_...``, newest first) appear on create, rotate
    and ``GET /v1/webhooks/endpoints/{id}``, never in lists."""

    id: str
    url: str
    created_at: datetime
    rotated_at: datetime | None
    secrets: list[str] | None = None


class DeliveryOut(BaseModel):
    """One webhook delivery, inbound or outbound. A stable shape (the dashboard reads it).

    - ``direction``: ``inbound`` (the Hub's webhook to us) or ``outbound`` (a scan's result to
      its callback URL).
    - ``state``: inbound ``accepted`` (scans queued) | ``duplicate`` (the same repo, commit and
      configuration were already scanned: ``scan_ids`` names that scan) | ``ignored`` (not a
      new commit of a watched model repo: ``reason`` says why) | ``rate_limited`` | ``failed``
      (a watch could not queue its scan: ``reason`` says why) | ``refused`` (bad or missing
      secret, or no JSON); with several watches the first of accepted, duplicate,
      rate_limited, failed that any watch reached names the delivery; outbound ``waiting``
      (the scan runs) | ``pending`` (due at ``next_attempt_at``) | ``delivered`` | ``dead``
      (every attempt failed; redeliver) | ``skipped`` (a discussion for a scan that did not
      succeed).
    - ``url``: outbound, the callback URL, or ``hf-discussion:<repo>`` for a watch's discussion
      on the scanned repo; inbound, the path it came to.
    - ``event``: inbound the Hub's ``event.scope`` (``repo.content``...); outbound
      ``scan.succeeded`` | ``scan.failed`` | ``scan.cancelled`` (None while waiting).
    - ``repo``/``revision``: inbound, the Hub repo and the commit taken from the payload.
    - ``headers`` and ``payload`` are given by ``GET /v1/webhooks/deliveries/{id}`` only (None
      in lists); inbound headers never include the secret.
    - ``links``: ``self``, ``redeliver`` (when allowed), ``scan`` (when one scan is concerned;
      ``merge`` for a merge's callback).
    """

    id: str
    direction: Literal["inbound", "outbound"]
    state: str
    event: str | None
    url: str | None
    repo: str | None
    revision: str | None
    scan_id: str | None
    scan_ids: list[str]
    watch_ids: list[str]
    endpoint_id: str | None
    reason: str | None
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    response_status: int | None
    created_at: datetime
    updated_at: datetime
    headers: dict[str, Any] | None = None
    payload: Any = None
    links: dict[str, str]


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    total: int
    limit: int
    offset: int


class BvCacheOut(BaseModel):
    """One injection BV in the cache (``ready``), or one being built (``building``), or a
    database record whose files are gone (``missing``). Fields as ``mergeshield.bv_cache``."""

    key: str
    state: Literal["ready", "building", "missing"]
    built_at: str  # ISO 8601: when built (ready) or when the build started
    scan: str | None = None  # the scan that built it, when this service built it
    recipe: dict[str, Any] | None = None
    size: int | None = None
    base: str | None = None
    base_revision: str | None = None
    data: str | None = None
    data_sha256: str | None = None
    own_asr: dict[str, RateModel] = Field(default_factory=dict)  # injected trigger -> ASR
    measured_on: str | None = None


# --- merges: a mergekit plan scanned, defended and merged (issue 17)


class MergeCreate(_Body):
    """A mergekit plan (``mergeshield merge-plan``'s input, see the README): its YAML text, or the
    same as a JSON object. Its ``base_model`` and ``models`` are hub ids (``org/name``, or at a
    branch, tag or commit ``org/name@<sha>``) or uploads (``upload:<id>``), never server paths;
    ``mergeshield.evaluation`` maps a model to its task's dataset (names as a scan's
    ``evaluation``) and ``mergeshield.scan`` holds the scans' ``ScanOptions``. A plan that
    cannot be merged exactly is a 422 ``invalid_config`` before anything is queued."""

    plan: Annotated[str, Field(max_length=MAX_PLAN_BYTES)] | dict[str, Any] = Field(examples=[
        "merge_method: task_arithmetic\nbase_model: org/base@main\nmodels:\n"
        "  - model: org/digits-finetune\n    parameters: {weight: 0.5}\n"
        "  - model: upload:0123456789abcdef0123456789abcdef\n    parameters: {weight: 0.5}\n"
        "mergeshield:\n  evaluation: {org/digits-finetune: org/digits}\n"
        "  scan: {inversion: false, max_eval: 500}\n"])
    device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: hub models, big uploads to gpu
    # POST the result here when the merge ends, signed per Standard Webhooks (see /v1/webhooks)
    callback_url: str | None = Field(default=None, max_length=2000)


class MergeOut(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str | None  # "scan 2/3: sweep", "choose_scale", "write_merge", "measure_merge"...
    percent: float
    base: str
    models: list[str]
    method: str  # task_arithmetic | ties | dare_ties | dare_linear
    policy: str  # clean | exclude | include
    plan: dict[str, Any]  # as validated, with every default filled in
    queue: str
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    verdict: str | None  # the worst verdict of the models' scans
    error: dict[str, Any] | None
    summary: dict[str, Any] | None  # models, merged, flagged, policy, method, scale (γ)
    artifacts_expired_at: datetime | None = None
    links: dict[str, str]
    # GET /v1/merges/{id} of a succeeded merge: its plan-report.json (None in lists)
    report: PlanReport | None = None


class MergePage(BaseModel):
    items: list[MergeOut]
    total: int
    limit: int
    offset: int
