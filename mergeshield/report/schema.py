"""The scan report: a versioned pydantic model, published as a JSON Schema file.

Bump ``SCHEMA_VERSION`` on any change a consumer could notice (a renamed or removed field, a new
required one). Rates always carry their denominator: ``hits`` / ``total`` and a 95% Wilson interval.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.1"  # 1.1: "cleaning" (what was removed, and whether it worked)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Severity(StrEnum):
    """Finding severity, ordered; ``--fail-on`` compares against it."""

    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"

    @property
    def rank(self) -> int:
        return ["LOW", "MEDIUM", "HIGH", "CRITICAL"].index(self.value)


class RateModel(_Model):
    """``hits`` out of ``total``, the rate and its 95% Wilson interval."""

    hits: int
    total: int
    rate: float
    ci95: tuple[float, float]


class FileDigest(_Model):
    path: str  # relative to the model's folder
    size: int  # bytes
    sha256: str


class ModelInput(_Model):
    source: str  # what the user gave: a repo id, a folder or a file
    kind: Literal["hub", "directory", "file"]
    revision_requested: str | None = None
    revision: str | None = None  # the commit sha it resolved to (hub sources)
    family: str | None = None  # the adapter that ran it, e.g. "vit", "clip"; None if unknown
    architecture: str | None = None  # config.json "architectures"[0]
    files: list[FileDigest] = Field(default_factory=list)
    # tensors per dtype, e.g. {"bfloat16": 200, "int64": 1}: a fine-tune may be stored in another
    # float precision than its base (task vectors are computed in float32, the cleaned
    # checkpoint is written in the suspect's dtypes)
    dtypes: dict[str, int] = Field(default_factory=dict)


class DatasetInput(_Model):
    source: str
    name: str
    classes: list[str]
    split: str  # the split evaluated
    size: int  # images evaluated
    sha256: str  # of the evaluated images and labels


class TensorStat(_Model):
    name: str
    numel: int
    norm: float  # L2 norm of the task vector's tensor
    relative_norm: float  # norm / L2 norm of the base tensor (0 when the base tensor is 0)
    cosine_with_injection_bv: float | None = None


class LayerStat(_Model):
    """The task vector's tensors of one layer together (``mergeshield.layers``)."""

    name: str  # e.g. "vit.encoder.layer.3", "vit.embeddings"
    n_tensors: int
    numel: int
    norm: float  # L2 norm of the layer's task-vector tensors together
    relative_norm: float  # norm / L2 norm of the layer's base tensors (0 when that is 0)


class SkippedTensor(_Model):
    name: str
    reason: str  # e.g. "head (not part of the task vector)", "non-float dtype int64"


class TaskVectorSummary(_Model):
    n_tensors: int
    n_parameters: int
    norm: float
    base_norm: float
    per_tensor: list[TensorStat]
    skipped: list[SkippedTensor]
    per_layer: list[LayerStat] = Field(default_factory=list)  # empty in older reports


class InjectionSummary(_Model):
    recipe: dict[str, Any]
    recipe_hash: str
    cached: bool  # True when BV_inj came from the cache instead of being trained now
    bv_norm: float
    cosine_with_task_vector: float  # cos(BV_inj, suspect task vector), global
    # θ_inj_bd's ASR per injected "trigger->target" (when built, or as the cache recorded it)
    own_asr: dict[str, RateModel] = Field(default_factory=dict)
    took: bool | None = None  # every injection reached the recipe's min_own_asr (None: unknown)


class TriggerMeasurement(_Model):
    id: str  # stable within a report, e.g. "probe:patch-checkerboard-3-bottom_right"
    source: Literal["injection", "probe", "user", "inverted"]
    spec: dict[str, Any]  # the trigger's full specification
    target: int
    target_class: str
    # what the trigger reaches without a backdoor: the base backbone with the suspect's head (an
    # inverted trigger: the larger of that and the median over the suspect's other targets)
    asr_reference: RateModel | None = None
    asr_before: RateModel  # the suspect checkpoint
    asr_after: RateModel | None = None  # the cleaned checkpoint
    preview_png: str | None = None  # base64 PNG: the trigger stamped on a sample input


class LambdaPoint(_Model):
    lam: float
    clean_accuracy: RateModel
    asr: dict[str, RateModel]  # trigger id -> ASR at this lambda


class SweepSummary(_Model):
    policy: str  # e.g. "largest lambda with clean-accuracy drop <= 2.0 points"
    budget_points: float
    chosen_lambda: float
    points: list[LambdaPoint]


class Metrics(_Model):
    clean_accuracy_reference: RateModel | None = None
    clean_accuracy_before: RateModel | None = None
    clean_accuracy_after: RateModel | None = None
    triggers: list[TriggerMeasurement] = Field(default_factory=list)


class Finding(_Model):
    id: str  # stable rule id, e.g. "MS001"
    severity: Severity
    title: str
    message: str
    trigger_id: str | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)


class Verdict(_Model):
    status: Literal["backdoor_suspected", "no_backdoor_found", "inconclusive"]
    severity: Severity | None  # the highest finding's severity, None without findings
    reasons: list[str]


class IncompleteReason(_Model):
    code: str  # an errors.py code or a stage name
    message: str


class AdapterOutput(_Model):
    """The cleaned result as a PEFT LoRA adapter of the base, offered when the suspect was a LoRA
    adapter and base + adapter reproduces the cleaned checkpoint to float tolerance: ``written``,
    or none, because it would be no smaller than the checkpoint (``not_smaller``) or could not be
    made exact (``not_exact``); ``message`` says which modules it holds, or why."""

    status: Literal["written", "not_smaller", "not_exact"]
    message: str  # one sentence for people
    directory: str | None = None  # the adapter folder (adapter_config.json + weights)
    files: list[FileDigest] = Field(default_factory=list)  # relative to ``directory``
    max_abs_error: float | None = None  # largest |base + adapter − cleaned|, re-merged


class OutputSummary(_Model):
    directory: str
    files: list[FileDigest]
    metadata: dict[str, str]  # what was written to the safetensors __metadata__
    adapter: AdapterOutput | None = None  # only when the suspect was a LoRA adapter


class UnlearningRound(_Model):
    unlearned: list[str]  # ids of the triggers stamped (true labels kept) in this round
    residual_asr: dict[str, RateModel]  # after the round: found triggers + a fresh patch search


CleaningStatus = Literal["removed", "not_removed", "precautionary", "not_cleaned"]


class CleaningSummary(_Model):
    """What the cleaned checkpoint is, in one status the user sees next to the download:
    ``removed`` (every found trigger below the residual rule; says nothing of a trigger the scan
    did not find), ``not_removed`` (one still
    responds: do not use it), ``precautionary`` (nothing found; IBVS and the
    precautionary unlearning applied anyway, at the stated cost) or ``not_cleaned`` (nothing
    found and nothing subtracted)."""

    status: CleaningStatus
    message: str  # one sentence for people
    steps: list[str]  # what was applied, in order, e.g. ["IBVS λ=2", "unlearning, 2 rounds"]
    ibvs_lambda: float
    unlearning: list[UnlearningRound] = Field(default_factory=list)
    clean_accuracy_cost_points: float | None = None  # before − after, in points (negative: gain)


class ScanReport(_Model):
    schema_version: str = SCHEMA_VERSION
    scanner_version: str
    scan_id: str
    created_at: str  # ISO 8601, UTC
    suspect: ModelInput
    base: ModelInput
    evaluation: DatasetInput | None = None
    config: dict[str, Any]
    config_hash: str
    device: str
    timings: dict[str, float]  # stage -> seconds
    task_vector: TaskVectorSummary | None = None
    injection: InjectionSummary | None = None
    metrics: Metrics = Field(default_factory=Metrics)
    sweep: SweepSummary | None = None
    findings: list[Finding] = Field(default_factory=list)
    verdict: Verdict
    incomplete: list[IncompleteReason] = Field(default_factory=list)
    cleaning: CleaningSummary | None = None
    output: OutputSummary | None = None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``ScanReport`` (published as ``schemas/report.schema.json``)."""
    schema = ScanReport.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://mergeshield.dev/schemas/report-{SCHEMA_VERSION}.json"
    return schema
