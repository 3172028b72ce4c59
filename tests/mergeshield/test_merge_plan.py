"""A mergekit plan in, a scanned and defended merge out (issue 17, first step): the plan's forms,
the policy's choices, and one plan end to end through the CLI on the quick zoo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open

from mergeshield.checkpoints import open_checkpoint, resolve
from mergeshield.errors import ConfigError
from mergeshield.merge_defence import SCALES
from mergeshield.merge_methods import dare_mergekit
from mergeshield.merge_plan import merged_as, plan_summary, run_plan
from mergeshield.merge_plan_schema import MergePlan, PlanReport
from mergeshield.merge_tasks import TaskOnMerge
from mergeshield.merging import MergeConfig, task_vectors
from mergeshield.plan_context import PlanContext
from mergeshield.report.io import load_report
from tests.support.zoo import Zoo

PLAN = {"merge_method": "task_arithmetic", "base_model": "org/base",
        "models": [{"model": "org/a", "parameters": {"weight": 0.6}},
                   {"model": "org/b", "parameters": {"weight": 0.2}}],
        "parameters": {"normalize": True}, "dtype": "float32"}


def test_a_mergekit_plan_reads_as_mergekit_merges_it() -> None:
    plan = MergePlan.parse(PLAN)
    cfg = plan.merge_config()
    assert cfg.method == "task_arithmetic" and cfg.weights == pytest.approx([0.75, 0.25])
    ties = MergePlan.parse({**PLAN, "merge_method": "ties", "parameters": {},
                            "models": [{"model": m, "parameters": {"weight": 1.0,
                                                                   "density": 0.3}}
                                       for m in ("org/a", "org/b")]})
    cfg = ties.merge_config()
    assert isinstance(cfg, MergeConfig)
    assert (cfg.method, cfg.ties_form, cfg.densities, cfg.normalize) == (
        "ties", "mergekit", [0.3, 0.3], True)  # mergekit's TIES: normalize unless said
    assert plan.mergeshield.policy == "clean"  # the default: flagged models enter cleaned


def test_a_dare_plan_reads_with_mergekits_defaults_and_a_seed() -> None:
    dare = MergePlan.parse({**PLAN, "merge_method": "dare_ties", "parameters": {},
                            "models": [{"model": "org/a", "parameters": {"density": 0.3}},
                                       {"model": "org/b", "parameters": {"weight": 0.5}}]})
    cfg = dare.merge_config()
    # mergekit's DARE: density 1 unless said, normalize off, rescale on; our seed 0 unless said
    assert (cfg.method, cfg.weights, cfg.densities, cfg.normalize, cfg.rescale, cfg.seed,
            cfg.models) == ("dare_ties", [1.0, 0.5], [0.3, 1.0], False, True, 0,
                            ["org/a", "org/b"])
    linear = MergePlan.parse({**PLAN, "merge_method": "dare_linear",
                              "parameters": {"normalize": True, "rescale": False},
                              "mergeshield": {"seed": 42}}).merge_config()
    assert (linear.method, linear.normalize, linear.rescale, linear.seed) == (
        "dare_linear", True, False, 42)


@pytest.mark.parametrize("change", [
    {"merge_method": "della"},  # not merged here (yet): refused, not merged differently
    {"parameters": {"lambda": 0.5}},  # mergekit's TIES scale: not read here (yet)
    {"merge_method": "ties", "parameters": {"rescale": True}},  # TIES rescaled: not here (yet)
    {"parameters": {"int8_mask": True}},  # no effect on the merge in mergekit; not read here
    {"merge_method": "dare_ties",
     "models": [{"model": "org/a", "parameters": {"density": 0.0}}]},  # DARE keeps (0, 1]
    {"merge_method": "dare_linear",
     "models": [{"model": "org/a", "parameters": {"density": 1.5}}]},
    {"merge_method": "dare_ties", "mergeshield": {"seed": -1}},
    {"models": []},
    {"models": [{"model": "org/a", "parameters": {"weight": float("nan")}}]},
    {"slices": [{"sources": []}]},  # a mergekit form we do not read
    {"mergeshield": {"policy": "trust"}},
    {"mergeshield": {"scan": {"lambdas": [-1]}}},
    {"mergeshield": {"scan": {"suspect": "org/other"}}},
])
def test_what_it_cannot_merge_exactly_is_refused_before_any_scan(change: dict[str, object]
                                                                 ) -> None:
    with pytest.raises(ConfigError) as err:
        MergePlan.parse({**PLAN, **change})
    assert err.value.code == "invalid_config"


def test_a_plan_file_is_plain_yaml(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("merge_method: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):  # safe_load: no tag constructs anything
        MergePlan.read(path)
    path.write_text(yaml.safe_dump(PLAN))
    assert MergePlan.read(path).base_model == "org/base"
    with pytest.raises(ConfigError):
        MergePlan.read(tmp_path / "absent.yaml")


@pytest.mark.parametrize(("policy", "flagged", "cleaned", "how"), [
    ("clean", False, True, "as is"), ("clean", True, True, "cleaned"),
    ("clean", True, False, "excluded"),  # flagged; not cleaned, or the repair did not hold
    ("exclude", True, True, "excluded"), ("exclude", False, True, "as is"),
    ("include", True, True, "as is")])
def test_the_policy_decides_what_enters_the_merge(policy: str, flagged: bool, cleaned: bool,
                                                  how: str) -> None:
    assert merged_as(policy, flagged, cleaned) == how


def _plan(zoo: Zoo, names: tuple[str, ...]) -> dict[str, Any]:
    """Task arithmetic of the zoo's ``names`` on its ViT base, each with its task's data; weight
    1 each, where the zoo's BadNets survives the merge (at task arithmetic's usual 0.3 its ASR on
    the quick zoo's merge falls to ~9 %: nothing left to defend)."""
    return {"merge_method": "task_arithmetic", "base_model": str(zoo.path("vit-base")),
            "models": [{"model": str(zoo.path(n)), "parameters": {"weight": 1.0}}
                       for n in names],
            "mergeshield": {"evaluation": {str(zoo.path(n)): str(zoo.dataset(n))
                                           for n in names},
                            # the probe panel finds the zoo's corner patch: no search needed
                            "scan": {"inversion": False, "max_eval": 500}}}


def test_a_plan_with_one_backdoored_model_merges_it_cleaned(zoo: Zoo, tmp_path: Path,
                                                            bv_cache_dir: Path) -> None:
    """The issue's plan: the three task fine-tunes of the ViT family, one of them backdoored,
    held against the same plan with the attacked task's clean fine-tune (the all-clean merge)."""
    bad, goods = "vit-mnist-badnets", ("vit-digits-clean", "vit-mnist-rot90-clean")
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(_plan(zoo, (bad, *goods))))
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "mergeshield.cli", "merge-plan",
                           str(tmp_path / "plan.yaml"), "--out", str(out), "--format", "json"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MERGESHIELD_CACHE_DIR": str(bv_cache_dir)})
    assert proc.returncode == 1, proc.stderr[-3000:]  # a model was flagged; the merge is written
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "plan-report.json").read_text())
    rows = {Path(r["model"]).name: r for r in report["models"]}
    assert (rows[bad]["verdict"], rows[bad]["merged_as"]) == ("backdoor_suspected", "cleaned")
    for good in goods:
        assert (rows[good]["verdict"], rows[good]["merged_as"]) == ("no_backdoor_found", "as is")
    # the defence lowers what survived the plain merge (how much survives depends on the zoo's
    # seed: the planted trigger's 77 % and 33 % undefended on seeds 0 and 1); the bar against the
    # all-clean merge is below
    found, before = rows[bad]["asr_merged"], rows[bad]["asr_undefended"]
    assert found and all(a["rate"] <= before[t]["rate"] for t, a in found.items()), (
        rows[bad]["asr_alone"], before, found)
    # how much of the cleaned model's correction the merge took: chosen on the merge itself
    defence = report["defence"]
    assert defence["scale"] in SCALES and len(defence["tried"]) == len(SCALES)
    chosen = next(t for t in defence["tried"] if t["scale"] == defence["scale"])
    assert chosen["removed"] and set(chosen["cost_points"]) == {str(zoo.path(n))
                                                               for n in (bad, *goods)}
    assert "γ =" in defence["message"] and "budget" in defence["message"]
    summary = plan_summary(PlanReport.model_validate(report))
    assert defence["message"] in summary
    for r in rows.values():  # the defence costs each task little against the plain merge
        assert r["accuracy_merged"]["rate"] >= r["accuracy_undefended"]["rate"] - 0.05, r
        assert r["accuracy_without"] is not None  # the merge of the models not flagged
    # the merge without the flagged model is the reference the report holds the trigger to
    for t, a in found.items():
        without = rows[bad]["asr_without"][t]["rate"]
        gap = 100 * (a["rate"] - without)
        assert (f"{100 * without:.1f} % without the flagged models: "
                + (f"{gap:.1f} points above" if gap > 0 else "not above")) in summary
    assert rows[goods[0]]["accuracy_without"]["rate"] >= rows[bad]["accuracy_without"]["rate"]
    assert (out / "undefended" / "model.safetensors").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["mergeshield.verdicts"])[str(zoo.path(bad))]["merged_as"] == "cleaned"
    assert float(meta["mergeshield.correction_scale"]) == defence["scale"]
    assert MergePlan.model_validate_json(meta["mergeshield.plan"]).models[0].model == str(
        zoo.path(bad))

    # the all-clean merge: a plan of clean models is merged as it is (nothing to defend)...
    clean_names = ("vit-mnist-clean", *goods)
    clean_plan = MergePlan.parse(_plan(zoo, clean_names))
    ctx = PlanContext(out_dir=tmp_path / "all-clean", cache_dir=bv_cache_dir, device="cpu")
    clean = run_plan(clean_plan, ctx)
    assert clean.defence is None and all(
        (r.verdict, r.merged_as) == ("no_backdoor_found", "as is") for r in clean.models)
    assert all(r.accuracy_merged == r.accuracy_undefended for r in clean.models)  # cost 0
    # ...and the found trigger, measured there with the clean fine-tune's head, answers the
    # defended merge within 10 points of it: a weaker form of the 5-point bar, which
    # bench/merge_plan_efficacy.py measures (this plan's planted trigger: +5.3 and +0.3 points
    # on zoo seeds 0 and 1; the merge without the flagged model, the report's stand-in for it,
    # was 2.3 and 5.9 points off)
    task = TaskOnMerge.of(load_report(out / "scans" / "0" / "report.json"),
                          str(zoo.path("vit-mnist-clean")), clean_plan, ctx, out / "scans" / "0")
    assert task is not None and {i for i, *_ in task.triggers} == set(found)
    on_clean = task.measure_outputs({"merged": ("all-clean", ctx.out_dir)}, ctx)["asr_merged"]
    for t, a in found.items():
        assert a["rate"] - on_clean[t].rate <= 0.10, (found, on_clean)


def test_a_dare_ties_plan_merges_with_its_seed_and_records_it(zoo: Zoo, tmp_path: Path,
                                                              bv_cache_dir: Path) -> None:
    names, densities = ("vit-mnist-clean", "vit-digits-clean"), [0.5, 0.7]
    models = [str(zoo.path(n)) for n in names]
    plan = MergePlan.parse({
        "merge_method": "dare_ties", "base_model": str(zoo.path("vit-base")),
        "models": [{"model": m, "parameters": {"weight": 1.0, "density": d}}
                   for m, d in zip(models, densities, strict=True)],
        "mergeshield": {"policy": "include", "seed": 11}})  # no evaluation data: quick scans
    out = tmp_path / "merged"
    report = run_plan(plan, PlanContext(out_dir=out, cache_dir=bv_cache_dir, device="cpu"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        written = {k: f.get_tensor(k) for k in f.keys()}
    recorded = json.loads(meta["mergeshield.merge"])
    assert recorded == report.merge
    assert {k: recorded[k] for k in ("method", "densities", "seed", "normalize", "rescale",
                                     "models")} == {
        "method": "dare_ties", "densities": densities, "seed": 11, "normalize": False,
        "rescale": True, "models": models}
    assert MergePlan.model_validate_json(meta["mergeshield.plan"]).mergeshield.seed == 11
    # the merge is merge_methods.dare_mergekit's, each model drawn under its name in the plan
    with ExitStack() as stack:
        base_ck, *cks = (stack.enter_context(open_checkpoint(resolve(str(zoo.path(n)))))
                         for n in ("vit-base", *names))
        base, tvs, _family = task_vectors(base_ck, cks)
        want = dict(dare_mergekit(tvs, densities, [1.0, 1.0], consensus=True, seed=11,
                                  draws=models).apply_lazily(base))
        assert set(want) == set(written)
        for k, t in want.items():
            assert torch.equal(written[k], t), k
        # where both models moved, an entry stays the base's only if both dropped it
        moved = changed = 0
        for k in tvs[0]:
            both = (tvs[0][k] != 0) & (tvs[1][k] != 0)
            moved += int(both.sum())
            changed += int((written[k] != base[k])[both].sum())
    assert abs(changed / moved - (1 - 0.5 * 0.3)) < 0.02, (changed, moved)


def test_a_plans_scans_build_their_bv_under_the_plans_guard(zoo: Zoo, tmp_path: Path) -> None:
    """A service's lock on building BV_inj (worker/bv_guard.py) spans its merges' scans too."""
    held: list[str] = []

    @contextmanager
    def guard(key: str) -> Iterator[None]:
        held.append(key)
        yield

    bad = "vit-mnist-badnets"
    plan = MergePlan.parse({**_plan(zoo, (bad,)), "mergeshield": {
        "policy": "include", "evaluation": {str(zoo.path(bad)): str(zoo.dataset(bad))},
        "scan": {"inversion": False, "probes": False, "max_eval": 100}}})
    ctx = PlanContext(out_dir=tmp_path / "merged", cache_dir=tmp_path / "cache", device="cpu",
                      bv_guard=guard)  # a cache of its own: the BV is built here
    run_plan(plan, ctx)
    injection = load_report(tmp_path / "merged" / "scans" / "0" / "report.json").injection
    assert injection is not None and not injection.cached
    assert len(held) == 1 and injection.recipe_hash in held[0]
