"""Measuring a suspect and sanitising it: the part of a scan that needs forward passes.

Every trigger the scan can name is measured on the *reference* model (the base backbone with the
suspect's head: what the task looks like before any fine-tuning) and on the suspect; then BV_inj is
built (or read from the cache), λ is swept and the chosen λ's model is measured again.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mergeshield import bv_cache, reference_cache
from mergeshield.data import ImageDataset, load_task
from mergeshield.evaluation import (
    Rate,
    attack_success_rate,
    best_target_asr,
    clean_accuracy,
    probe_panel,
)
from mergeshield.ibvs import (
    Shifted,
    SweepPoint,
    build_injection_bv,
    choose_lambda,
    focus,
    injected_backdoors,
    sweep,
)
from mergeshield.inversion import InversionConfig, invert_blends, invert_triggers, invert_warps
from mergeshield.models import Classifier, ModelFamily
from mergeshield.report.schema import (
    DatasetInput,
    InjectionSummary,
    LambdaPoint,
    Metrics,
    RateModel,
    SweepSummary,
    TriggerMeasurement,
    UnlearningRound,
)
from mergeshield.report.verdict import finding_gap, still_responds
from mergeshield.task_vectors import TaskVector, cosine
from mergeshield.training import Progress
from mergeshield.triggers import ImageTrigger, Trigger, WarpTrigger, digest, preview_png, trigger_id
from mergeshield.unlearning import Found, RoundReport, repair

SearchKind = Literal["patch", "blend", "warp"]  # what an inversion search reconstructs

if TYPE_CHECKING:
    from mergeshield.pipeline import ScanRequest

MAX_TRACKED = 6  # triggers followed across the λ sweep (each costs one pass per λ)
SEARCH_ROWS = 512  # training rows a trigger search (inversion, the repair's re-search) optimises on


@dataclass(frozen=True)
class Measurement:
    dataset: DatasetInput
    metrics: Metrics
    injection: InjectionSummary
    sweep: SweepSummary
    bv: TaskVector  # BV_inj over the backbone (as subtracted: focused)
    chosen_lambda: float
    correction: TaskVector  # θ_cleaned − θ_suspect: −λ·BV_inj, plus the unlearning vector U
    unlearning: list[UnlearningRound]  # empty: nothing found, or unlearning turned off
    inverted: dict[str, ImageTrigger | WarpTrigger]  # inverted triggers by id (the report's)


@dataclass
class _Probe:
    id: str
    source: str
    trigger: Trigger
    target: int
    spec: dict[str, Any]
    ref: Rate | None = None
    before: Rate | None = None
    after: Rate | None = None


def measure_and_sanitise(
    request: ScanRequest,
    family: ModelFamily,
    base: Mapping[str, Tensor],
    suspect: Mapping[str, Tensor],
    tau: TaskVector,
    base_revision: str,
    *,
    device: torch.device,
    stage: Callable[[str], Any],
    cache_dir: str | None,
    hub: Mapping[str, Any],
    given_bv: tuple[TaskVector, str] | None = None,
    progress: Progress | None = None,
    bv_guard: Callable[[str], AbstractContextManager[None]] | None = None,
    base_label: str | None = None,  # how the BV cache names the base (ScanContext.labels)
) -> Measurement:
    assert request.evaluation is not None
    with stage("load_data"):
        # photos of mixed sizes: resized to the model's own input side
        side = family.preprocessing.image_size
        task = load_task(request.evaluation, revision=request.evaluation_revision,
                         max_test=request.max_eval, seed=request.seed,
                         image_size=request.image_size, mixed_size=side, **hub)
        inj_task = task if request.injection_data is None else load_task(
            request.injection_data, seed=request.seed, image_size=request.image_size,
            mixed_size=side, **hub)
        test = task.test
        classes = test.classes
        search = sample_rows(task.train, SEARCH_ROWS, request.seed)  # what trigger searches use
    head = family.head_from(base, suspect)

    def models() -> tuple[Classifier, Classifier]:  # (reference, suspect), both untrained
        return (family.classifier(base, head, classes).to(device),
                family.classifier(suspect, head, classes).to(device))

    with stage("build_models"):  # B/32: seconds each on 2 cores, so timed on their own
        ref, sus = models()
    # the reference (base backbone, the suspect's head) is the same for every fine-tune of one
    # base on one task: what is measured on it is read from the cache once a scan measured it
    reference = reference_cache.identity(ref, base_revision, classes, search.sha256(),
                                         test.sha256()) if cache_dir else None
    on_reference = partial(reference_cache.rates, cache_dir, reference)

    def ref_asr(trigger: Trigger, target: int) -> Rate:
        what = {"kind": "asr", "target": target,
                "trigger": hashlib.sha256(trigger.model_dump_json().encode()).hexdigest()}
        return on_reference(what, lambda: [attack_success_rate(ref, test, trigger, target)])[0]

    # the suspect's ASR as attack_success_rate measures it, by probe id: the sweep's λ = 0 is
    # the suspect itself and reads these instead of measuring them again
    exact: dict[str, Rate] = {}
    with stage("measure_suspect"):
        ca_ref = on_reference({"kind": "clean_accuracy"}, lambda: [clean_accuracy(ref, test)])[0]
        ca_before = clean_accuracy(sus, test)
        probes = _named_triggers(request, test, sus)
        for p in probes:
            p.ref = ref_asr(p.trigger, p.target)
            if p.before is None:
                p.before = exact[p.id] = attack_success_rate(sus, test, p.trigger, p.target)
    if request.inversion:
        with stage("invert_triggers"):  # the reference's side searched once per reference
            # (kind, size): the patch; a half-area one, quiet on clean fine-tunes; a faint blend
            # and a smooth warp, what a small patch does not reach
            searches: list[tuple[SearchKind, float]] = [("patch", 1.0)]
            if request.inversion_small_patch is not None:
                searches.append(("patch", request.inversion_small_patch))
            if request.inversion_blend_alpha is not None:
                searches.append(("blend", request.inversion_blend_alpha))
            if request.inversion_warp_shift is not None:
                searches.append(("warp", request.inversion_warp_shift))
            for i, (kind, size) in enumerate(searches):
                step = (partial(_share, progress, "invert_triggers", i, len(searches))
                        if progress else None)
                probes.append(_inverted(request, search, test, ref, sus, kind, size,
                                        on_reference, on_step=step))
                exact[probes[-1].id] = probes[-1].before  # type: ignore[assignment]

    injected = injected_backdoors(request.recipe, len(classes), test.images.shape[-1])
    own: dict[str, RateModel] = {}  # the injected model's own ASR (built now, or as cached)

    def own_asr(model: Classifier) -> None:  # θ_inj_bd: did the injection take?
        own.update({f"{trigger_id(t)}->{tgt}": attack_success_rate(model, test, t, tgt)
                    .to_model() for t, tgt in injected})

    with stage("injection_bv"):
        loaded: TaskVector | None
        if given_bv is not None:  # the user's own BV: nothing to build
            loaded, key = given_bv
        else:
            key = request.recipe.digest(base_revision, inj_task.train.sha256())
            loaded = bv_cache.load(cache_dir, key)
        cached = loaded is not None
        if loaded is None:  # build under the guards; another builder may have finished meanwhile
            with bv_cache.build_guard(cache_dir, bv_guard)(key):
                loaded = bv_cache.load(cache_dir, key)
                cached = loaded is not None
                if loaded is None:
                    # their room goes to BV_inj's two fine-tunes; rebuilt unchanged after them
                    del ref, sus
                    make = family.task_classifier(base, inj_task.train, device=device)
                    loaded = build_injection_bv(make, inj_task.train, request.recipe,
                                                held_out=test, progress=progress,
                                                inspect=lambda _clean, bd: own_asr(bd))
                    # cached whether or not every injection took: the report and the cache
                    # page show ``took`` and each own ASR
                    bv_cache.store(cache_dir, key, loaded, request.recipe.model_dump(mode="json"))
                    bv_cache.describe(
                        cache_dir, key, base=base_label or _model_name(request.base),
                        base_revision=base_revision, data=inj_task.name,
                        data_sha256=inj_task.train.sha256(),
                        own_asr={k: v.model_dump() for k, v in own.items()},
                        measured_on=f"the injected model on {task.name} test, {len(test)} images")
                    ref, sus = models()
        if cached:
            own = bv_cache.own_asr(cache_dir, key)
        bv = focus(loaded, tau, request.focus)
        del loaded  # the unfocused BV_inj: not kept beside the focused one
    for trig, target in injected:
        p = _Probe(f"injection:{trigger_id(trig)}->{target}", "injection", trig, target,
                   trig.model_dump(mode="json"))
        p.ref = ref_asr(trig, target)
        p.before = exact[p.id] = attack_success_rate(sus, test, trig, target)
        probes.append(p)

    with stage("sweep"):
        tracked = _tracked(probes, request.min_asr_gap)
        theta = {k: suspect[k].float() for k in bv}  # read once, not once per λ
        moved = [False]  # sus still holds θ_suspect exactly (λ = 0 comes first)

        def evaluate(lam: float) -> SweepPoint:
            if lam == 0.0 and not moved[0]:  # the suspect as measured: its rates are read
                point = SweepPoint(lam, ca_before, {
                    p.id: exact.get(p.id) or attack_success_rate(sus, test, p.trigger, p.target)
                    for p in tracked})
            else:
                sus.load_backbone(Shifted(theta, bv, lam))
                moved[0] = True
                point = SweepPoint(lam, clean_accuracy(sus, test),
                                   {p.id: attack_success_rate(sus, test, p.trigger, p.target)
                                    for p in tracked})
            if progress:
                progress("sweep", (request.lambdas.index(lam) + 1) / len(request.lambdas))
            return point

        points = sweep(evaluate, request.lambdas)
        lam = (request.fixed_lambda if request.fixed_lambda is not None
               else choose_lambda(points, request.budget_points))
    rounds: list[RoundReport] = []
    chosen = [p for p in probes if _is_finding(p, request.min_asr_gap)]
    instead = (bool(chosen) and request.unlearning.enabled and not request.unlearning.with_ibvs
               and request.fixed_lambda is None)
    if not chosen and request.unlearning.precautionary:  # the suspicion short of a finding:
        # the inverted patch and blend, as measured (a warp is unlearned when it is a finding)
        chosen = [p for p in probes
                  if p.source == "inverted" and isinstance(p.trigger, ImageTrigger)]
    found = [Found(p.id, p.trigger, p.target, p.ref.rate if p.ref else 0.0) for p in chosen]
    unlearn = bool(found) and request.unlearning.enabled
    if instead:
        lam = 0.0  # the found-trigger repair instead of the subtraction (UnlearnConfig)
    sus.load_backbone(Shifted(theta, bv, lam))
    if unlearn:
        with stage("unlearn"):  # sus holds θ − λ·BV_inj; repaired in place
            rounds = repair(
                sus, sample_rows(inj_task.train, request.unlearning.max_train, request.seed),
                test, search, found, request.unlearning,
                still_responds=partial(still_responds, min_asr_gap=request.min_asr_gap),
                inversion=(InversionConfig(steps=request.inversion_steps, seed=request.seed)
                           if request.inversion else None), seed=request.seed,
                accuracy_floor=ca_before.rate - request.budget_points / 100, progress=progress)
    with stage("measure_cleaned"):  # what the sweep already measured at λ is not redone
        done = None if rounds else next((pt for pt in points if pt.lam == lam), None)
        ca_after = done.clean_accuracy if done else clean_accuracy(sus, test)
        for p in probes:
            p.after = (done.asr[p.id] if done and p.id in done.asr
                       else attack_success_rate(sus, test, p.trigger, p.target))

    sample = test.images[0]
    metrics = Metrics(
        clean_accuracy_reference=ca_ref.to_model(), clean_accuracy_before=ca_before.to_model(),
        clean_accuracy_after=ca_after.to_model(),
        triggers=[_measurement(p, classes, sample) for p in probes],
    )
    live = sus.backbone_state()  # read once below, by the correction: no copy of the backbone
    cleaned = {k: live[k].detach().float().cpu() for k in bv}
    return Measurement(
        dataset=DatasetInput(source=task.source, name=task.name, classes=list(classes),
                             split="test", size=len(test), sha256=test.sha256()),
        metrics=metrics,
        injection=InjectionSummary(recipe=({"given_bv": request.bv} if given_bv else
                                           request.recipe.model_dump(mode="json")),
                                   recipe_hash=key, cached=cached, bv_norm=bv.norm(),
                                   own_asr=own,
                                   took=(_took(own, request.recipe.min_own_asr) if own and not
                                         given_bv else None),
                                   cosine_with_task_vector=cosine(bv, tau)),
        sweep=SweepSummary(
            policy=(f"fixed λ={lam}" if request.fixed_lambda is not None else
                    "λ = 0: a backdoor was found, unlearned instead of subtracted" if instead else
                    f"largest λ with clean-accuracy drop <= {request.budget_points} points"),
            budget_points=request.budget_points, chosen_lambda=lam,
            points=[LambdaPoint(lam=pt.lam, clean_accuracy=pt.clean_accuracy.to_model(),
                                asr={k: r.to_model() for k, r in pt.asr.items()})
                    for pt in points],
        ),
        bv=bv,
        chosen_lambda=lam,
        correction=TaskVector.between(theta, cleaned, list(bv)).materialize(),
        unlearning=[UnlearningRound(unlearned=list(r.unlearned),
                                    residual_asr={k: v.to_model() for k, v in r.residual.items()})
                    for r in rounds],
        inverted={p.id: p.trigger for p in probes
                  if p.source == "inverted" and isinstance(p.trigger, ImageTrigger | WarpTrigger)},
    )


def _named_triggers(request: ScanRequest, test: ImageDataset, sus: Classifier) -> list[_Probe]:
    """Probe panel and user triggers; a trigger without a target gets the suspect's best one."""
    named: list[tuple[str, Trigger, int | None]] = []
    if request.probes:
        named += [("probe", t, None) for t in probe_panel(int(test.images.shape[-1]))]
    targets = list(request.user_targets) + [None] * len(request.triggers)
    named += [("user", t, targets[i]) for i, t in enumerate(request.triggers)]
    out = []
    for source, trig, target in named:
        probe = _Probe(f"{source}:{trigger_id(trig)}", source, trig, target or 0,
                       trig.model_dump(mode="json"))
        if target is None:  # the search already measured the suspect's ASR at its best target
            probe.target, probe.before = best_target_asr(sus, test, trig)
        out.append(probe)
    return out


def _share(progress: Progress, stage: str, i: int, n: int, fraction: float) -> None:
    """Part ``i`` of ``n`` of a stage is ``fraction`` done."""
    progress(stage, (i + fraction) / n)


def _inverted(request: ScanRequest, opt: ImageDataset, test: ImageDataset, ref: Classifier,
              sus: Classifier, kind: SearchKind = "patch", size: float = 1.0,
              on_reference: Callable[[dict[str, Any], Callable[[], list[Rate]]], list[Rate]]
              = lambda _search, compute: compute(), *,
              on_step: Callable[[float], None] | None = None) -> _Probe:
    """Invert one trigger per target on the suspect and on the reference; keep the target whose
    trigger stands out most: a small patch of ``size`` × the default area (below 1 its id is
    ``inverted-small``), a full-image blend at α = ``size``, or a smooth warp of at most ``size``
    pixels per 28 of the image's side (``kind``: ``invert_triggers`` / ``_blends`` / ``_warps``).
    Its baseline (``ref``) is what such a search reaches *without* a backdoor: the larger of the
    same search on the reference model (same budget and seed) and the median over the suspect's
    other targets (Neural Cleanse's outlier view, which still holds when the reference is near
    chance, as a tiny CLIP's zero-shot head is). ``on_reference(search, compute)`` gives the
    reference's side (``reference_cache.rates``: searched once per reference and search)."""
    area_scale = size if kind == "patch" else 1.0
    cfg = InversionConfig(steps=request.inversion_steps, seed=request.seed,
                          area_fraction=InversionConfig.area_fraction * area_scale)
    k = len(test.classes)
    shift = size * int(test.images.shape[-1]) / 28  # pixels at this resolution

    def search(clf: Classifier, on_step: Callable[[float], None] | None = None
               ) -> Sequence[Trigger]:
        if kind == "patch":
            return invert_triggers(clf, opt.images, opt.labels, k, cfg, on_step=on_step)
        if kind == "blend":
            return invert_blends(clf, opt.images, opt.labels, range(k), cfg, size, on_step)
        return invert_warps(clf, opt.images, opt.labels, range(k), cfg, shift, on_step=on_step)

    def reference_rates() -> list[Rate]:
        theirs = search(ref)
        return [attack_success_rate(ref, test, theirs[t], t) for t in range(k)]

    name = {"blend": "inverted-blend", "warp": "inverted-warp"}.get(
        kind, "inverted" if area_scale == 1.0 else "inverted-small")
    mine = search(sus, on_step)  # (the reference's search, when not cached, is not counted)
    on_sus = [attack_success_rate(sus, test, mine[t], t) for t in range(k)]
    on_ref = on_reference({"kind": name, "config": asdict(cfg),
                           "alpha": size if kind == "blend" else None,
                           **({"shift": shift} if kind == "warp" else {})}, reference_rates)
    best: _Probe | None = None
    for t in range(k):
        median = others_median([r.rate for r in on_sus], t)
        baseline = on_ref[t] if on_ref[t].rate >= median else _rate_near(median, on_sus[t].total)
        if best is None or on_sus[t].rate - baseline.rate > best.before.rate - best.ref.rate:  # type: ignore[union-attr]
            sha = digest(mine[t])
            trig = mine[t]
            if kind == "patch":  # invert_triggers' hard mask: its pixels are the area
                assert isinstance(trig, ImageTrigger) and trig.mask is not None
                area = round(float(torch.tensor(trig.mask).sum()))
                shape: dict[str, float] = {"area_pixels": area}
            else:
                shape = {"alpha": size} if kind == "blend" else {"max_shift_pixels": shift}
            spec = {"kind": name, "target": t, "steps": cfg.steps, "sha256": sha, **shape,
                    "suspect_asr_by_target": [round(r.rate, 4) for r in on_sus],
                    "reference_asr_by_target": [round(r.rate, 4) for r in on_ref],
                    "baseline": "max(same search on the reference model, median over the "
                                "suspect's other targets)"}
            best = _Probe(f"{name}:target-{t}", "inverted", mine[t], t, spec, baseline, on_sus[t])
    assert best is not None
    return best


def others_median(rates: Sequence[float], t: int) -> float:
    """The (upper) median of ``rates`` over every target but ``t``: what an inverted search
    reaches towards a target with no backdoor, on the suspect itself (Neural Cleanse's outlier
    view)."""
    others = sorted(r for i, r in enumerate(rates) if i != t)
    return others[len(others) // 2]


def _is_finding(p: _Probe, gap: float) -> bool:
    """The verdict's own rule: this trigger is a finding (so the cleaning unlearns it)."""
    assert p.before is not None
    return finding_gap(p.source, p.before.rate, p.before.ci95[0], p.ref.rate if p.ref else 0.0,
                       gap) is not None


def _took(own: Mapping[str, RateModel], floor: float) -> bool:
    """Every injected backdoor reached ``floor`` own ASR."""
    return bool(own) and min(r.rate for r in own.values()) >= floor


def sample_rows(data: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    """At most ``n`` rows of ``data``, a seeded draw (all of it when ``n`` is None)."""
    if n is None or len(data) <= n:
        return data
    gen = torch.Generator().manual_seed(seed)
    return data.subset(torch.randperm(len(data), generator=gen)[:n])


def _model_name(source: str) -> str:
    """A hub id as given; a local path by its last part (the cache never records server paths)."""
    return Path(source).name if Path(source).expanduser().exists() else source


def _rate_near(rate: float, total: int) -> Rate:
    return Rate(round(rate * total), total)


def _tracked(probes: list[_Probe], gap: float) -> list[_Probe]:
    """The triggers worth following across λ: user ones, then the widest suspect-vs-ref gaps."""
    def widening(p: _Probe) -> float:
        return (p.before.rate if p.before else 0.0) - (p.ref.rate if p.ref else 0.0)

    user = [p for p in probes if p.source == "user"]
    rest = sorted((p for p in probes if p.source != "user" and widening(p) >= gap / 2),
                  key=widening, reverse=True)
    return (user + rest)[:MAX_TRACKED]


def _measurement(p: _Probe, classes: tuple[str, ...], sample: Tensor) -> TriggerMeasurement:
    assert p.before is not None
    return TriggerMeasurement(
        id=p.id, source=p.source, spec=p.spec, target=p.target,  # type: ignore[arg-type]
        target_class=classes[p.target],
        asr_reference=p.ref.to_model() if p.ref else None, asr_before=p.before.to_model(),
        asr_after=p.after.to_model() if p.after else None,
        preview_png=base64.b64encode(preview_png(sample, p.trigger)).decode(),
    )
