"""What each ``mergeshield`` sub-command does: turn arguments into library calls and print."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergeshield import adapters, backdoor_vectors, checkpoints
from mergeshield.cli_progress import ProgressPrinter
from mergeshield.errors import ConfigError
from mergeshield.file_safety import read_option_file
from mergeshield.ibvs import DEFAULT_GRID, InjectionRecipe
from mergeshield.merging import MergeConfig, merged_tensors, task_vectors
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.report import exit_code, to_sarif, to_text
from mergeshield.report.io import strict_json
from mergeshield.report.schema import Severity
from mergeshield.settings import Settings
from mergeshield.task_vectors import TaskVector
from mergeshield.triggers import Trigger, parse_trigger
from mergeshield.unlearning import UnlearnConfig


def _hub(settings: Settings) -> dict[str, Any]:
    return {"token": settings.token(), "endpoint": settings.hf_endpoint,
            "cache_dir": settings.cache_dir}


def run_scan(args: argparse.Namespace, settings: Settings) -> int:
    try:
        request = _request(args)
    except ValidationError as exc:
        # a scan option out of its bounds (mergeshield/options.py): which one and why
        raise ConfigError.listing("invalid scan option(s)", exc) from None
    return _scan(args, settings, request)


MAX_TRIGGER_FILE = 2**20  # bytes: a trigger list, not a dataset


def _user_triggers(args: argparse.Namespace) -> tuple[list[Trigger], list[int | None]]:
    """``--trigger`` specs in order, with ``--target`` for the plain ones, in that order; a spec
    ``@file.json`` is a JSON list whose entries are a trigger (an object or a short form) or
    ``{"trigger": ..., "target": N}``."""
    triggers: list[Trigger] = []
    targets: list[int | None] = []
    plain = iter(args.target)
    for spec in args.trigger:
        if not spec.startswith("@"):
            triggers.append(parse_trigger(spec))
            targets.append(next(plain, None))
            continue
        for entry in _trigger_file(Path(spec[1:])):
            named = isinstance(entry, dict) and "trigger" in entry
            triggers.append(parse_trigger(entry["trigger"] if named else entry))
            targets.append(entry.get("target") if named else None)
    return triggers, targets


def _trigger_file(path: Path) -> list[Any]:
    raw = read_option_file(path, MAX_TRIGGER_FILE, "trigger file")
    try:
        entries = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError)
        raise ConfigError(f"{path.name}: not a JSON list of triggers",
                          details={"file": path.name}) from None
    if not isinstance(entries, list):
        raise ConfigError(f"{path.name}: not a JSON list of triggers",
                          details={"file": path.name})
    return entries


def _request(args: argparse.Namespace) -> ScanRequest:
    triggers, targets = _user_triggers(args)
    return ScanRequest(
        suspect=args.suspect, base=args.base, suspect_revision=args.revision,
        base_revision=args.base_revision, evaluation=args.evaluation,
        evaluation_revision=args.eval_revision, injection_data=args.inject_data,
        image_size=args.image_size,
        lambdas=args.lambdas or list(DEFAULT_GRID), fixed_lambda=args.fixed_lambda, bv=args.bv,
        budget_points=args.budget, triggers=triggers, user_targets=targets,
        probes=not args.no_probes,
        inversion=not args.no_inversion, max_eval=args.max_eval,
        unlearning=UnlearnConfig(enabled=not args.no_unlearning),
        recipe=InjectionRecipe(**{k: v for k, v in (("epochs", args.inject_epochs),
                                                   ("max_train", args.inject_max_train))
                                  if v is not None}),
    )


def _scan(args: argparse.Namespace, settings: Settings, request: ScanRequest) -> int:
    progress = ProgressPrinter(style="json" if args.format == "json" and not sys.stderr.isatty()
                               else None)
    ctx = ScanContext(
        out_dir=args.out, formats=tuple(f.strip() for f in args.report.split(",") if f.strip()),
        local_files_only=args.offline, device=args.device or settings.device,
        progress=progress, **_hub(settings),
    )
    try:
        report = scan(request, ctx)
    finally:
        progress.close()
    if args.format == "json":
        print(report.model_dump_json(indent=2))
    elif args.format == "sarif":
        print(strict_json(to_sarif(report), indent=2))
    else:
        print(to_text(report))
    return exit_code(report, Severity(args.fail_on))


def run_zoo(args: argparse.Namespace) -> int:
    import dataclasses

    from mergeshield.zoo import ZooConfig, build_zoo

    cfg = dataclasses.replace(ZooConfig.for_speed(args.quick, args.seed),
                              families=tuple(args.families.split(",")))
    progress = ProgressPrinter(whole_scan=False)
    manifest = build_zoo(args.out, cfg, progress=progress)
    progress.close()
    print(f"{len(manifest['models'])} models and {len(manifest['datasets'])} datasets in "
          f"{args.out} ({manifest['build_seconds']} s); ground truth in {args.out}/manifest.json")
    return 0


def run_bv(args: argparse.Namespace, settings: Settings) -> int:
    hub = _hub(settings)
    if args.bv_command == "compute":
        base = checkpoints.resolve(args.base, **hub) if args.base else None  # resolved once
        clean_src, bd_src = (_model(checkpoints.resolve(p, **hub), base, hub)
                             for p in (args.clean, args.backdoored))
        with checkpoints.open_checkpoint(clean_src) as clean, \
                checkpoints.open_checkpoint(bd_src) as bd:
            bv = backdoor_vectors.from_checkpoints(clean, bd)
            checkpoints.save_checkpoint(args.out, bv.stream(),
                                        specs=backdoor_vectors.file_specs(clean, bd),
                                        metadata={"mergeshield.kind": "backdoor_vector",
                                                  "mergeshield.clean": args.clean,
                                                  "mergeshield.backdoored": args.backdoored})
            print(f"BV over {len(bv)} tensors, norm {bv.norm():.4f} -> {args.out}")
        return 0
    opened = [checkpoints.open_checkpoint(checkpoints.resolve(p, **hub)) for p in args.bvs]
    bvs = [TaskVector.stored(ck) for ck in opened]
    matrix = backdoor_vectors.similarity(bvs)
    result: dict[str, Any] = {"bvs": args.bvs, "cosine": matrix}
    if args.per_tensor and len(bvs) >= 2:
        result["per_tensor_first_pair"] = backdoor_vectors.tensor_similarity(bvs[0], bvs[1])
    print(json.dumps(result, indent=2))
    return 0


def _model(src: checkpoints.ResolvedSource, base: checkpoints.ResolvedSource | None,
           hub: dict[str, Any]) -> checkpoints.ResolvedSource:
    """``src``, or the model a LoRA adapter makes with ``base`` (which it then needs)."""
    if not adapters.is_adapter(src):
        return src
    if base is None:
        raise ConfigError(f"{src.source} is a LoRA adapter: give --base, the model it adapts, "
                          "so the model it makes can be read", details={"adapter": src.source})
    return adapters.as_model(src, base, cache_dir=hub["cache_dir"])


def run_merge(args: argparse.Namespace, settings: Settings) -> int:
    hub = _hub(settings)
    cfg = MergeConfig(method=args.method, weights=args.weights, keep=args.keep, seed=args.seed,
                      subtract_lambda=args.subtract_lambda if args.subtract else 0.0)
    base_src = checkpoints.resolve(args.base, **hub)
    with checkpoints.open_checkpoint(base_src) as base_ck:
        models = [checkpoints.open_checkpoint(adapters.as_model(
            checkpoints.resolve(m, **hub), base_src, cache_dir=hub["cache_dir"]))
            for m in args.models]
        base, tvs, _family = task_vectors(base_ck, models)
        bv = None
        if args.subtract:
            ck = checkpoints.open_checkpoint(checkpoints.resolve(args.subtract, **hub))
            bv = TaskVector.stored(ck)
        info = base.info  # type: ignore[attr-defined]
        files = checkpoints.save_checkpoint(
            args.out, merged_tensors(base, tvs, cfg, bv), specs={k: info(k) for k in base},
            config=base_src.config, extra_files=checkpoints.extra_files(base_src),
            metadata={"mergeshield.merge": cfg.model_dump_json(),
                      "mergeshield.models": json.dumps(args.models)},
        )
        for ck in models:
            ck.close()
    print(f"merged {len(tvs)} models ({cfg.method}) -> {', '.join(str(f) for f in files)}")
    return 0


def run_merge_plan(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 1 when a model of the plan was flagged (the merge is written either way), else 0."""
    from mergeshield.merge_plan import plan_summary, run_plan
    from mergeshield.merge_plan_schema import MergePlan
    from mergeshield.plan_context import PlanContext

    plan = MergePlan.read(args.plan)
    hub = _hub(settings)
    report = run_plan(plan, PlanContext(
        out_dir=args.out, cache_dir=hub.pop("cache_dir"), device=args.device or settings.device,
        local_files_only=args.offline, hub=hub))
    (args.out / "plan-report.json").write_text(report.model_dump_json(indent=2))
    print(report.model_dump_json(indent=2) if args.format == "json" else plan_summary(report))
    return 1 if any(r.verdict == "backdoor_suspected" for r in report.models) else 0


def run_bench(args: argparse.Namespace) -> int:
    from mergeshield.experiments.runner import PaperConfig, run_paper

    cfg = PaperConfig(out=args.out, zoo=args.zoo, quick=args.quick, seed=args.seed,
                      only=tuple(args.only), scale=args.scale)
    progress = ProgressPrinter(whole_scan=False)
    try:
        results = run_paper(cfg, progress)
    finally:
        progress.close()
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items())
    print(f"wrote {', '.join(results['files'])} to {args.out} ({timings})")
    failed = [c for c in results["claims"] if c["held"] is False and c.get("stable", True)]
    for c in results["claims"]:
        if c["held"] is not None:
            print(f"claim {c['id']}: {'holds' if c['held'] else 'FAILS'} ({c['expect']}; "
                  f"measured {c['measured']:.3f})")
        elif c.get("reason"):
            print(f"claim {c['id']}: not measurable ({c['reason']})")
    return 1 if args.check and failed else 0
