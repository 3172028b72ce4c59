"""The one product function: ``scan(request) -> ScanReport``.

The CLI, the worker and the tests all call it. Stages, in order: resolve the two checkpoints, check
they share a backbone, measure the task vector, measure the suspect (clean accuracy and ASR of every
trigger it can name: probes, user triggers, injection triggers, inverted triggers), build or load
BV_inj, sweep λ, write the cleaned checkpoint, decide the verdict, write the report.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mergeshield import __version__, adapter_export, adapters, checkpoints
from mergeshield.errors import ConfigError, UnsupportedModelError
from mergeshield.ibvs import DEFAULT_GRID, Focus, InjectionRecipe
from mergeshield.measure import Measurement, measure_and_sanitise
from mergeshield.model_card import check_card_base
from mergeshield.models import ModelFamily, backbone_keys, family_for
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
    Share,
    WarpShift,
)
from mergeshield.report import ScanReport, decide, write_report
from mergeshield.report.schema import (
    AdapterOutput,
    CleaningStatus,
    CleaningSummary,
    FileDigest,
    Finding,
    IncompleteReason,
    Metrics,
    ModelInput,
    OutputSummary,
)
from mergeshield.task_vector_summary import summarise
from mergeshield.task_vectors import TaskVector
from mergeshield.training import Progress
from mergeshield.triggers import INVERTED_FILE, Trigger, save_image_triggers
from mergeshield.unlearning import UnlearnConfig


class ScanRequest(BaseModel):
    """What to scan and how. Everything here enters the configuration hash (the cache key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    suspect: str  # hub repo id, HF-layout folder, .safetensors or .bin file
    base: str  # the base model the suspect was fine-tuned from
    suspect_revision: str | None = None  # branch, tag or sha (hub sources)
    base_revision: str | None = None
    evaluation: str | None = None  # dataset: bundled name, folder or hub dataset id
    evaluation_revision: str | None = None
    # resize every evaluation (and injection) image to this side; None: as stored, and a folder
    # of images of mixed sizes resized to the model's own input side
    image_size: ImageSide | None = None
    injection_data: str | None = None  # the defender's data for BV_inj; default: ``evaluation``
    recipe: InjectionRecipe = Field(default_factory=InjectionRecipe)
    focus: Focus = Field(default_factory=Focus)  # which part of BV_inj is subtracted
    # after IBVS, a found backdoor is unlearned (mergeshield/unlearning.py)
    unlearning: UnlearnConfig = Field(default_factory=UnlearnConfig)
    # bounds (finite, generous ceilings): mergeshield.options
    lambdas: list[Lambda] = Field(default_factory=lambda: list(DEFAULT_GRID), min_length=1,
                                  max_length=MAX_LIST)
    budget_points: Points = 2.0  # max clean-accuracy drop (points) the chosen λ may cost
    fixed_lambda: Lambda | None = None  # skip the sweep's choice and use this λ
    bv: str | None = None  # subtract this BV (a `mergeshield bv compute` output) instead of BV_inj
    # user-supplied triggers
    triggers: list[Trigger] = Field(default_factory=list, max_length=MAX_TRIGGERS)
    # per user trigger; None = any
    user_targets: list[ClassIndex | None] = Field(default_factory=list, max_length=MAX_TRIGGERS)
    probes: bool = True  # measure the probe panel
    # reconstruct triggers by inversion (a few seconds per model); False also keeps the
    # unlearning to the triggers found otherwise (no blend or patch search while repairing)
    inversion: bool = True
    inversion_steps: InversionSteps = 60
    # the inversion also searches a full-image pattern blended in at this α (blends and warps,
    # which no small patch reaches); None: the patch search alone (docs/decisions.md, "Detection")
    inversion_blend_alpha: Share | None = 0.1
    # also a patch with this share of the first one's area (0.5: image/162 pixels), quiet on
    # clean fine-tunes; None (the default): not searched. It found one more attack on the dev
    # split and none on the test4 hold-out (docs/decisions.md, "Detection: a half-area patch")
    inversion_small_patch: Share | None = None
    # also a smooth warp (WaNet's family) of at most this many pixels per 28 of the image's side,
    # which neither a patch nor a blend reproduces: on the dev split it found the 4 planted warps
    # at their target (the patch and blend 2), its highest score on 12 clean fine-tunes 0.21
    # against the 0.3 line; None: not searched (docs/decisions.md, "Detection: a warp search")
    inversion_warp_shift: WarpShift | None = 2.0
    max_eval: EvalImages | None = 1000  # test images evaluated (seeded subset); None = all
    # finding threshold: suspect ASR (CI low) − reference ASR; its TPR/FPR over the seeded
    # population of experiment 6 is the "Scan verdict" line of docs/results/detection.md
    min_asr_gap: Fraction = 0.2
    seed: Seed = 0

    def config_hash(self) -> str:
        """Hash of how to scan, not of what: models enter cache keys by their weights' sha256."""
        what = {"suspect", "base", "suspect_revision", "base_revision"}
        return hashlib.sha256(self.model_dump_json(exclude=what).encode()).hexdigest()


@dataclass
class ScanContext:
    """Where and how to run: not part of the configuration hash."""

    out_dir: Path | None = None  # cleaned checkpoint + report; None = report only
    formats: tuple[str, ...] = ("json",)  # also "sarif", "html", "text"
    token: str | None = None  # hub token; never logged nor reported
    endpoint: str | None = None  # hub endpoint (mirrors, private hubs)
    cache_dir: Path | None = None  # hub downloads and the BV_inj cache
    local_files_only: bool = False
    min_free_bytes: int | None = None  # free disk a hub download must leave; None = no check
    device: str | None = None  # "cuda", "cpu"; None = CUDA when present
    scan_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    progress: Progress | None = None
    # local paths a request may name; None = any (CLI). A service sets its uploads folder, so a
    # request can name hub ids, bundled datasets and uploads, never the server's own files.
    allowed_roots: tuple[Path, ...] | None = None
    # held while BV_inj for a key is built, so two workers never build one key twice (a
    # service's database row); the cache folder's file lock is always held inside it as well
    bv_guard: Callable[[str], AbstractContextManager[None]] | None = None
    # how reports, __metadata__ and the BV cache name "suspect", "base" and the "output" folder;
    # default: the source as given (the BV cache: a local path by its last part). A service
    # names an upload by its file name, id and sha256, never by where it keeps the file.
    labels: dict[str, str] = field(default_factory=dict)


# Where each stage sits on the 0–100 progress scale: its share of a CPU scan that builds its
# BV_inj (a default-scale ViT scan with BV_inj and the reference's searches cached spends ~55 % of
# its time inverting triggers and ~30 % unlearning). The fine-tunes (inject-*, unlearn) report
# their steps; the other stages move at their ends.
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "resolve": (0, 4), "task_vector": (4, 6), "load_data": (6, 7), "build_models": (7, 8),
    "measure_suspect": (8, 14), "invert_triggers": (14, 30), "injection_bv": (30, 32),
    "inject-clean": (32, 46), "inject-bd": (46, 60), "sweep": (60, 70), "unlearn": (70, 92),
    "measure_cleaned": (92, 96), "summary": (96, 97), "write_checkpoint": (97, 99),
}


def percent(stage: str, fraction: float) -> float | None:
    """Overall progress (0–100) of ``fraction`` of the way through ``stage``; None if unknown."""
    span = STAGE_SPANS.get(stage)
    if span is None:
        return None
    lo, hi = span
    return round(lo + (hi - lo) * min(max(fraction, 0.0), 1.0), 1)


class _Timer:
    def __init__(self, progress: Progress | None) -> None:
        self.timings: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.progress:
            self.progress(name, 0.0)
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)


Inputs = tuple[checkpoints.ResolvedSource, checkpoints.ResolvedSource]  # (suspect, base)


def scan(request: ScanRequest, ctx: ScanContext | None = None,
         inputs: Inputs | None = None) -> ScanReport:
    """Scan ``request.suspect`` against ``request.base``; write outputs to ``ctx.out_dir``.

    ``inputs``: the pair ``resolve_inputs`` returned, when the caller resolved it already (the
    worker does, for the cache key), so nothing is downloaded or hashed twice."""
    ctx = ctx or ScanContext()
    timer = _Timer(ctx.progress)
    device = torch.device(ctx.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hub: dict[str, Any] = {"token": ctx.token, "endpoint": ctx.endpoint,
                           "cache_dir": ctx.cache_dir, "local_files_only": ctx.local_files_only}
    with timer.stage("resolve"):
        suspect_src, base_src = inputs or resolve_inputs(request, ctx)
    incomplete: list[IncompleteReason] = []
    family: ModelFamily | None = None
    try:
        family = family_for(base_src.config, suspect_src.config,
                            processor=checkpoints.read_json(base_src, "preprocessor_config.json"),
                            tokenizer_root=str(base_src.root))
    except UnsupportedModelError as exc:
        incomplete.append(IncompleteReason(code=exc.code, message=exc.message))
    if request.evaluation is None:
        incomplete.append(IncompleteReason(
            code="no_evaluation_data",
            message="no evaluation dataset was given, so clean accuracy and ASR were not "
                    "measured and nothing was sanitised: pass --eval"))

    with checkpoints.open_checkpoint(suspect_src) as suspect_ck, \
            checkpoints.open_checkpoint(base_src) as base_ck:
        suspect_w = family.canonical(suspect_ck) if family else suspect_ck
        base_w = family.canonical(base_ck) if family else base_ck
        dtypes = {"suspect": _dtypes(suspect_ck), "base": _dtypes(base_ck)}
        with timer.stage("task_vector"):
            keys, skipped = backbone_keys(family, base_w, suspect_w)
            checkpoints.check_compatible(base_w, suspect_w, keys=set(keys).__contains__)
            tau = TaskVector.between(base_w, suspect_w, keys)
        given = _given_bv(request, tau, hub)
        m: Measurement | None = None
        if family is not None and request.evaluation is not None:
            m = measure_and_sanitise(
                request, family, base_w, suspect_w, tau, _revision_of(base_src),
                device=device, stage=timer.stage, hub=hub, given_bv=given, progress=ctx.progress,
                cache_dir=str(ctx.cache_dir) if ctx.cache_dir else None, bv_guard=ctx.bv_guard,
                base_label=ctx.labels.get("base"),
            )
        # what gets added: the measured cleaning, or a given BV at a given λ (unmeasured)
        step: tuple[TaskVector, float, str] | None = None
        if m is not None:
            step = (m.correction, m.chosen_lambda, m.injection.recipe_hash)
        elif given is not None and request.fixed_lambda is not None:
            step = (given[0] * -request.fixed_lambda, request.fixed_lambda, given[1])
        elif given is not None:
            incomplete.append(IncompleteReason(
                code="no_lambda", message="a BV was given but nothing was measured to choose λ "
                                          "with: pass --lambda to subtract it anyway"))
        with timer.stage("summary"):
            tv_summary = summarise(tau, base_w, skipped,
                                   m.bv if m else given[0] if given else None)
        findings, verdict = decide(m.metrics.triggers if m else [], incomplete=incomplete,
                                   min_asr_gap=request.min_asr_gap)
        cleaning = describe_cleaning(m, findings, step[1] if step else None)
        output = None
        if ctx.out_dir is not None and step is not None:
            with timer.stage("write_checkpoint"):
                output = _write_cleaned(ctx, suspect_src, base_src, suspect_w, *step, cleaning)
    report = ScanReport(
        scanner_version=__version__, scan_id=ctx.scan_id,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        suspect=_model_input(suspect_src, family, ctx.labels.get("suspect"), dtypes["suspect"]),
        base=_model_input(base_src, family, ctx.labels.get("base"), dtypes["base"]),
        evaluation=m.dataset if m else None,
        config=request.model_dump(mode="json") | {  # the request as labelled, not server paths
            role: ctx.labels[role] for role in ("suspect", "base") if role in ctx.labels},
        config_hash=request.config_hash(),
        device=str(device), timings=timer.timings, task_vector=tv_summary,
        injection=m.injection if m else None, metrics=m.metrics if m else Metrics(),
        sweep=m.sweep if m else None,
        findings=findings, verdict=verdict, incomplete=incomplete, cleaning=cleaning,
        output=output,
    )
    if ctx.out_dir is not None:
        write_report(report, ctx.out_dir, ctx.formats)
        if m and m.inverted:  # the triggers the report describes, for a plan to measure
            save_image_triggers(ctx.out_dir / INVERTED_FILE, m.inverted)
    return report


def resolve_inputs(request: ScanRequest, ctx: ScanContext) -> Inputs:
    """(suspect, base) located and checked; local paths only inside ``ctx.allowed_roots``; the
    base must be the one the suspect's model card names, if it names one."""
    if ctx.allowed_roots is not None:
        for name in ("suspect", "base", "evaluation", "injection_data", "bv"):
            _check_local(name, getattr(request, name), ctx.allowed_roots)
    kw: dict[str, Any] = {"token": ctx.token, "endpoint": ctx.endpoint,
                          "cache_dir": ctx.cache_dir, "local_files_only": ctx.local_files_only,
                          "min_free_bytes": ctx.min_free_bytes}
    suspect = checkpoints.resolve(request.suspect, revision=request.suspect_revision, **kw)
    base = checkpoints.resolve(request.base, revision=request.base_revision, **kw)
    check_card_base(suspect.root, base.source, base.kind, base.config)
    # a LoRA adapter: scanned as the model it makes
    suspect = adapters.as_model(suspect, base, cache_dir=ctx.cache_dir,
                                min_free_bytes=ctx.min_free_bytes)
    return suspect, base


def cache_key(request: ScanRequest, inputs: Inputs) -> str:
    """sha256 of (suspect weights' sha256, base revision, scanner version, configuration hash)."""
    suspect_src, base_src = inputs
    digest = hashlib.sha256()
    for path, _size, sha in suspect_src.files_digest():
        digest.update(f"{path}:{sha}\n".encode())
    digest.update(f"{_revision_of(base_src)}\n{__version__}\n{request.config_hash()}".encode())
    return digest.hexdigest()


def _check_local(name: str, value: str | None, roots: tuple[Path, ...]) -> None:
    if value is None or not Path(value).expanduser().exists():
        return
    real = Path(value).expanduser().resolve()
    if not any(real.is_relative_to(r.resolve()) for r in roots):
        raise ConfigError(f"{name}: {value!r} names a local path, which is not allowed here; "
                          "give a hub id or an uploaded file", details={"field": name})


def _revision_of(src: checkpoints.ResolvedSource) -> str:
    """The base's identity in cache keys: its commit sha, or the hash of its weight files."""
    if src.revision:
        return src.revision
    digest = hashlib.sha256()
    for path, _size, sha in src.files_digest():
        digest.update(f"{path}:{sha}".encode())
    return "sha256:" + digest.hexdigest()


def _model_input(src: checkpoints.ResolvedSource, family: ModelFamily | None,
                 label: str | None = None, dtypes: dict[str, int] | None = None) -> ModelInput:
    archs = (src.config or {}).get("architectures") or [None]
    return ModelInput(
        source=label or src.source, kind=src.kind, revision_requested=src.revision_requested,
        revision=src.revision, family=family.name if family else None, architecture=archs[0],
        files=[FileDigest(path=p, size=s, sha256=h) for p, s, h in src.files_digest()],
        dtypes=dtypes or {},
    )


def _dtypes(ck: checkpoints.Checkpoint) -> dict[str, int]:
    """Tensors per dtype, from the headers (no tensor is read)."""
    return dict(sorted(Counter(str(ck.info(k).dtype).removeprefix("torch.") for k in ck).items()))


def _given_bv(request: ScanRequest, tau: TaskVector, hub: dict[str, Any]
              ) -> tuple[TaskVector, str] | None:
    """The user's BV (lazily read), restricted to the suspect's task-vector tensors, and its id."""
    if request.bv is None:
        return None
    src = checkpoints.resolve(request.bv, **hub)
    ck = checkpoints.open_checkpoint(src)  # stays open while the scan reads it
    checkpoints.check_compatible(ck, tau, keys=set(tau).__contains__)  # the file's own dtypes
    return TaskVector.stored(ck).restrict(tau), "given:" + _revision_of(src)


def describe_cleaning(m: Measurement | None, findings: list[Finding], lam: float | None
                      ) -> CleaningSummary | None:
    """The cleaning's status in words, from the verdict's findings (MS003: a found trigger still
    responds on the cleaned model)."""
    if m is None or lam is None:
        return None
    what = "found-trigger" if findings else "precautionary"
    steps = [f"IBVS λ={lam:g}"] + ([f"{what} unlearning, {len(m.unlearning)} round(s)"]
                                   if m.unlearning else [])
    before, after = m.metrics.clean_accuracy_before, m.metrics.clean_accuracy_after
    cost = round((before.rate - after.rate) * 100, 2) if before and after else None
    priced = f" (clean accuracy {-cost:+.1f} points)" if cost is not None else ""
    left = sorted({f.trigger_id or "" for f in findings if f.id == "MS003"})
    status: CleaningStatus
    if left:
        status, msg = "not_removed", (
            f"backdoor not removed: {', '.join(left)} still responds on the cleaned checkpoint; "
            "do not use it")
    elif findings:
        # says what was measured: the found triggers, not a trigger the scan never saw (on the
        # efficacy bench a few "removed" checkpoints still obey their hidden trigger: docs/efficacy)
        status, msg = "removed", ("found backdoor removed: no trigger the scan found responds on "
                                  f"the cleaned checkpoint after {' + '.join(steps)}{priced}; "
                                  "one it did not find may still work")
    elif lam > 0 or m.unlearning:
        status, msg = "precautionary", (f"nothing found; {' + '.join(steps)} applied as a "
                                        f"precaution{priced}")
    else:
        status, msg = "not_cleaned", ("nothing found and nothing subtracted (λ=0): the output "
                                      "equals the suspect")
    return CleaningSummary(status=status, message=msg, steps=steps, ibvs_lambda=lam,
                           unlearning=m.unlearning, clean_accuracy_cost_points=cost)


def _write_cleaned(ctx: ScanContext, suspect_src: checkpoints.ResolvedSource,
                   base_src: checkpoints.ResolvedSource, suspect_w: Mapping[str, Tensor],
                   correction: TaskVector, lam: float, recipe_hash: str,
                   cleaning: CleaningSummary | None) -> OutputSummary:
    """θ' = θ_suspect + correction (−λ·BV_inj, plus the unlearning vector when a backdoor was
    found), streamed to ``ctx.out_dir`` with provenance and the cleaning's status in
    __metadata__, so the file itself says whether the backdoor was removed."""
    assert ctx.out_dir is not None
    metadata = {
        "format": "pt",
        "mergeshield.scan_id": ctx.scan_id,
        "mergeshield.scanner_version": __version__,
        "mergeshield.suspect": ctx.labels.get("suspect", suspect_src.source),
        "mergeshield.suspect_revision": suspect_src.revision or "",
        "mergeshield.base": ctx.labels.get("base", base_src.source),
        "mergeshield.base_revision": base_src.revision or "",
        "mergeshield.ibvs_lambda": repr(lam),
        "mergeshield.recipe_hash": recipe_hash,
        "mergeshield.cleaning": cleaning.status if cleaning else "unmeasured",
        "mergeshield.cleaning_message": (cleaning.message if cleaning else
                                         "a given BV subtracted at a given λ; nothing measured"),
    }
    info = suspect_w.info  # type: ignore[attr-defined]
    files = checkpoints.save_checkpoint(
        ctx.out_dir, correction.apply_lazily(suspect_w, 1.0),
        specs={k: info(k) for k in suspect_w}, config=suspect_src.config,
        extra_files=checkpoints.extra_files(suspect_src), metadata=metadata,
    )
    adapter = None
    if isinstance(suspect_src, adapters.MergedSource):  # offered as an adapter too, if exact
        adapter = _offer_adapter(ctx, suspect_src, base_src, files, metadata)
    return OutputSummary(
        directory=ctx.labels.get("output", str(ctx.out_dir)),
        files=[FileDigest(path=p.name, size=p.stat().st_size, sha256=checkpoints.sha256_file(p))
               for p in files],
        metadata=metadata, adapter=adapter,
    )


def _offer_adapter(ctx: ScanContext, merged: adapters.MergedSource,
                   base_src: checkpoints.ResolvedSource, files: list[Path],
                   metadata: dict[str, str]) -> AdapterOutput:
    """The cleaned checkpoint in ``files`` as a LoRA adapter of the base, or why not."""
    assert ctx.out_dir is not None
    got = adapter_export.offer(ctx.out_dir, merged, base_src,
                               [p for p in files if p.suffix == ".safetensors"],
                               metadata=metadata,
                               base_label=ctx.labels.get("base", base_src.source))
    where = f"{ctx.labels.get('output', str(ctx.out_dir))}/{adapter_export.FOLDER}"
    return AdapterOutput(
        status=got.status, message=got.message, directory=where if got.folder else None,
        files=[FileDigest(path=p.name, size=p.stat().st_size, sha256=checkpoints.sha256_file(p))
               for p in got.files],
        max_abs_error=got.max_abs_error)
