"""The efficacy bench end to end at a tiny size on the quick zoo: behaviour, not numbers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from mergeshield.efficacy.baselines import RepairConfig
from mergeshield.efficacy.bench import DEFENCES, BenchConfig
from mergeshield.efficacy.runner import run_efficacy
from mergeshield.efficacy.world import World, WorldConfig
from mergeshield.experiments.dam import DAMConfig
from mergeshield.training import FinetuneConfig
from tests.support.zoo import Zoo

SHORT = FinetuneConfig(epochs=1, lr=1e-3, min_steps=0)


def test_the_bench_plants_defends_and_reports(zoo: Zoo, bv_cache_dir: Path,
                                              tmp_path: Path) -> None:
    cfg = BenchConfig(
        zoo=zoo.root, work=tmp_path / "work", split="ci", attacks=1, clean=1, max_draws=1,
        families=("patch",), defences=tuple(d for d in DEFENCES if d != "ibvs-plain"),
        min_asr=0.5, merge_methods=("task_arithmetic",), comeback=SHORT,
        world=WorldConfig(finetune=FinetuneConfig(epochs=2, lr=1e-3, min_steps=100),
                          defender_images=400, eval_images=300, tasks=("digits", "mnist")),
        cache_dir=bv_cache_dir, scan_overrides={"inversion": False, "max_eval": 300},
        repair=RepairConfig(finetune=SHORT, holdout=100, prune_step=0.25, anp_steps=10),
        dam=DAMConfig(steps=3, images=64))
    out = run_efficacy(cfg, tmp_path / "docs")
    files = {p.name for p in (tmp_path / "docs").iterdir()}
    assert {"ci.md", "cut-vs-cost-ci.png", "results.json"} <= files

    stored = json.loads((tmp_path / "docs" / "results.json").read_text())["ci"]
    (row,) = stored["cases"]["attacks"]
    assert row["attack"]["family"] == "patch" and row["planted"]
    asr = row["own_asr"]
    assert asr["rate"] >= 0.5 and 0 < asr["total"] <= 300  # target-class images left out
    # identical scan requests run once: every scan defence names the one whose result it shares
    aliases = stored["cases"]["aliases"]
    assert set(aliases) == {"product", "ibvs-focused"} and aliases["product"] == "product"
    for name in (d for d in cfg.defences if d != "dam"):  # dam: merge setting only
        res = row["defences"][name]
        assert 0 <= res["asr"]["rate"] <= 1 and res["asr"]["total"] == asr["total"]
        assert set(res["comeback_merge_asr"]) == {"task_arithmetic"}
        merged = row["merge"]["task_arithmetic"]["defences"][name]
        assert len(merged["accuracy"]) == 2  # every merged task is measured
    assert row["defences"]["fine-tuning"]["flagged"] is None  # repairs do not detect
    dam = row["merge"]["task_arithmetic"]["defences"]["dam"]  # a merge-time defence only
    assert dam["asr"]["total"] == asr["total"] and "dam" not in row["defences"]
    assert isinstance(row["defences"]["product"]["flagged"], bool)

    summary = out["summary"]["defences"]["product"]["overall"]
    assert summary["detection"]["tpr"]["total"] == 1 and summary["detection"]["fpr"]["total"] == 1
    assert summary["single"]["attacks"] == 1
    assert out["summary"]["defences"]["dam"]["overall"]["single"] is None
    assert "Single checkpoint" in (tmp_path / "docs" / "ci.md").read_text()



def test_the_clip_family_plants_into_folders_a_scan_reads(zoo: Zoo, tmp_path: Path) -> None:
    """``--family clip``: the bench's CLIP suspects are saved as the zoo saves its CLIP
    fine-tunes (a vision tower under the zoo's config) and read back unchanged; its pages and
    results key are suffixed so they sit beside the ViT ones. (The whole bench on the quick
    zoo's CLIP ran, product only, in 3 minutes: too long for CI.)"""
    w = World(zoo.root, WorldConfig(family="clip", tasks=("digits",)))
    backbone = {k: v + 0.01 for k, v in w.clean["digits"].items()}
    folder = w.save("digits", backbone, tmp_path / "suspect")
    assert json.loads((folder / "config.json").read_text()) == json.loads(
        (w.path(w.clean_names["digits"]) / "config.json").read_text())
    back = w.load(folder)
    assert back.keys() == backbone.keys()
    assert all(torch.equal(back[k], backbone[k]) for k in backbone)
    cfg = BenchConfig(zoo=zoo.root, work=tmp_path, split="test6",
                      world=WorldConfig(family="clip"))
    assert cfg.label == "test6-clip" and replace(cfg, world=WorldConfig()).label == "test6"
