"""Found-trigger unlearning: the stamped set keeps every label; a repair removes a planted trigger
from a zoo model, stops when nothing responds, and undoes a round that breaks the budget."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageClassification

from mergeshield import checkpoints
from mergeshield.data import ImageDataset, load_task
from mergeshield.evaluation import attack_success_rate, clean_accuracy
from mergeshield.inversion import InversionConfig
from mergeshield.measure import SEARCH_ROWS
from mergeshield.models import Classifier, family_for
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.report.verdict import still_responds
from mergeshield.triggers import BlendedTrigger, PatchTrigger, parse_trigger, triggered_test_set
from mergeshield.unlearning import Found, UnlearnConfig, repair, unlearning_set
from tests.support.zoo import Zoo


def _data(n: int = 100) -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    return ImageDataset(torch.rand(n, 1, 8, 8, generator=gen), torch.arange(n) % 10,
                        tuple(str(i) for i in range(10)), "toy")


def test_unlearning_set_stamps_a_share_and_keeps_every_label() -> None:
    data = _data()
    triggers = [(PatchTrigger(pattern="solid", size=2, location="top_left"), 0),
                (BlendedTrigger(alpha=0.2, seed=3), 1)]
    out = unlearning_set(data, triggers, 0.2, seed=0)
    assert torch.equal(out.labels, data.labels)  # the trigger must come to mean nothing
    changed = (out.images != data.images).flatten(1).any(1)
    assert int(changed.sum()) == 20  # 10 rows per trigger
    assert not torch.equal(out.images, data.images) and data.images.max() <= 1  # input untouched
    assert torch.equal(unlearning_set(data, triggers, 0.2, seed=0).images, out.images)  # seeded


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_unlearning_config_refuses_a_fraction_outside_the_open_interval(fraction: float) -> None:
    with pytest.raises(ValueError):
        UnlearnConfig(stamp_fraction=fraction)


def _badnets(zoo: Zoo) -> tuple[Classifier, ImageDataset, ImageDataset, ImageDataset,
                                  PatchTrigger, int]:
    """The zoo's BadNets model, the defender's rows and search rows as a scan draws them, its
    test set, trigger and target."""
    name = "vit-mnist-badnets"
    m = zoo.model(name)
    base_src = checkpoints.resolve(str(zoo.path(m["base"])))
    src = checkpoints.resolve(str(zoo.path(name)))
    fam = family_for(base_src.config, src.config)
    with checkpoints.open_checkpoint(base_src) as b, checkpoints.open_checkpoint(src) as s:
        base, sus = dict(fam.canonical(b)), dict(fam.canonical(s))
    task = load_task(str(zoo.dataset(name)), max_test=500, seed=0)
    clf = fam.classifier(sus, fam.head_from(base, sus), task.test.classes)
    trigger = parse_trigger(m["attack"]["trigger"])
    assert isinstance(trigger, PatchTrigger)
    rows = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))
    # the defender's rows as a scan draws them (at most max_train; the rows are stored by class)
    return (clf, task.train.subset(rows[:UnlearnConfig().max_train]),
            task.train.subset(rows[:SEARCH_ROWS]), task.test, trigger, m["attack"]["target"])


def test_repair_removes_the_planted_trigger_and_reports_each_round(zoo: Zoo) -> None:
    """The zoo's BadNets model, its own trigger given as found: one round takes it below the
    verdict's residual rule and the loop stops there."""
    clf, train, search, test, trigger, target = _badnets(zoo)
    before = attack_success_rate(clf, test, trigger, target).rate
    ca = clean_accuracy(clf, test).rate
    rounds = repair(clf, train, test, search,
                    [Found("probe:planted", trigger, target, 0.05)],
                    UnlearnConfig(rounds=3), still_responds=partial(still_responds),
                    inversion=InversionConfig(steps=20), accuracy_floor=ca - 0.05)
    after = attack_success_rate(clf, test, trigger, target).rate
    assert before > 0.8 and after < 0.2, (before, after)
    assert 1 <= len(rounds) <= 3
    last = rounds[-1]
    assert "probe:planted" in last.unlearned and any(u.startswith("round0:blend") for u in
                                                     rounds[0].unlearned)
    assert {"probe:planted", f"reinverted:target-{target}"} <= set(last.residual)
    if len(rounds) < 3:  # stopped early: because nothing responded any more
        assert not still_responds(last.residual["probe:planted"].rate, 0.05)
    assert clean_accuracy(clf, test).rate >= ca - 0.05


def test_a_larger_patch_towards_each_target_is_unlearned_when_asked(zoo: Zoo) -> None:
    """``large_patch_scale``: each round also unlearns a patch of that many times the search's
    area, inverted towards the found target (what a trigger wider than the mask needs)."""
    clf, train, search, test, trigger, target = _badnets(zoo)
    cfg = UnlearnConfig(rounds=1, epochs=1, large_patch_scale=4)
    [only] = repair(clf, train, test, search, [Found("probe:planted", trigger, target, 0.05)],
                    cfg, still_responds=partial(still_responds),
                    inversion=InversionConfig(steps=10), accuracy_floor=0.0)
    assert f"round0:large-patch->{target}" in only.unlearned
    assert only.unlearned[:2] == ("probe:planted", f"round0:blend->{target}")
    assert attack_success_rate(clf, test, trigger, target).rate < 0.2
    with pytest.raises(ValueError):  # a "larger" patch no larger than the search's
        UnlearnConfig(large_patch_scale=1)


# Three attacks the scanner was never tuned on (not the zoo's triggers, not the probe panel's
# corners), one seed each. Off-corner patches only: at the quick zoo's scale blends and patches
# across token borders mostly do not plant (55 % for a random 4-px patch at (12, 9)) or are not
# detected (a stripes blend: probe gap 19.7 points, under the 20 needed); the efficacy bench
# measures those families at default scale (docs/efficacy).
UNSEEN = {
    1: (PatchTrigger(pattern="checkerboard", size=3, location=(5, 19)), 2),
    2: (PatchTrigger(pattern="random", size=3, location=(18, 6), seed=5), 7),
    3: (PatchTrigger(pattern="checkerboard", size=4, location=(10, 10), value=0.9), 5),
}


def _plant(zoo: Zoo, seed: int, out: Path) -> float:
    """The zoo's own recipe (its base, the task's probe head, ρ = 0.1) with ``seed``, trained
    again longer while the backdoor has not taken, as the zoo does (``zoo.plant_schedule``)."""
    from mergeshield.training import finetune
    from mergeshield.triggers import poison
    from mergeshield.zoo import ZooConfig, plant_schedule

    trigger, target = UNSEEN[seed]
    base_src = checkpoints.resolve(str(zoo.path("vit-base")))
    fam = family_for(base_src.config, base_src.config)
    with checkpoints.open_checkpoint(base_src) as b:
        base = dict(fam.canonical(b))
    task = load_task(str(zoo.dataset("vit-mnist-clean")))
    make = fam.task_classifier(base, task.train, device=torch.device("cpu"))
    poisoned, _ = poison(task.train, trigger, target, 0.1, seed=seed)
    # one retry more than the zoo's: seed 2's random patch took 0.48, 0.72 and 0.80 here after
    # 8, 10 and 18 epochs (an attacker trains until the backdoor takes)
    cfg = replace(ZooConfig.for_speed(quick=True), plant_retries=3)
    for ft in plant_schedule(cfg):
        clf = make()
        finetune(clf, poisoned, replace(ft, seed=seed))
        own = attack_success_rate(clf, task.test, trigger, target).rate
        if own >= cfg.plant_floor:
            break
    clf.model.save_pretrained(out)
    shutil.copy(zoo.path("vit-mnist-clean") / "preprocessor_config.json", out)
    return own


def _hidden(folder: Path, zoo: Zoo, seed: int) -> tuple[float, float]:
    """(hidden-trigger ASR, clean accuracy) of ``folder`` through transformers' own loader."""
    trigger, target = UNSEEN[seed]
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    test = load_task(str(zoo.dataset("vit-mnist-clean"))).test
    stamped = triggered_test_set(test, trigger, target)
    with torch.no_grad():
        asr = (model(pixel_values=(stamped.images - 0.5) / 0.5).logits.argmax(-1)
               == target).float().mean().item()
        acc = (model(pixel_values=(test.images - 0.5) / 0.5).logits.argmax(-1)
               == test.labels).float().mean().item()
    return asr, acc


def test_default_scan_cleans_the_unseen_backdoors_it_finds(zoo: Zoo, bv_cache_dir: Path,
                                                           tmp_path: Path,
                                                           record_property: Callable[[str, object],
                                                                                     None],
                                                           ) -> None:
    """The weaker CI form of issue 12's claims, over three seeds and triggers: every planted
    model the default scan flags loses at least 60 % of its hidden-trigger ASR (the scan never
    sees that trigger) at most 4 points of clean accuracy, with a cleaning status that agrees with
    the residual rule; one it does not flag is reported `precautionary` (never `removed`), with
    the precautionary repair applied and the hidden ASR lower than before; and at least one of the
    three is flagged, so a scan that stops finding anything fails CI.

    Not "all three flagged": the efficacy bench's hold-out flagged 19 of 40 drawn attacks (5 of 9
    patches), and seed 1 here went unflagged on a 1-thread build of the quick zoo (inverted-trigger
    gap 11 points, 20 needed) while 2-thread builds flagged it. Each seed's numbers are recorded in
    the junit XML (`<seed>_flagged`, `<seed>_asr_before`, ...) for the spread."""
    flagged = []
    for seed in sorted(UNSEEN):
        suspect, out = tmp_path / f"suspect-{seed}", tmp_path / f"out-{seed}"
        own = _plant(zoo, seed, suspect)
        assert own >= 0.8, f"seed {seed} did not plant ({own:.3f})"
        before, acc_before = _hidden(suspect, zoo, seed)  # the same, through transformers' loader
        report = scan(ScanRequest(suspect=str(suspect), base=str(zoo.path("vit-base")),
                                  evaluation=str(zoo.dataset("vit-mnist-clean")), max_eval=1000),
                      ScanContext(out_dir=out, cache_dir=bv_cache_dir))
        after, acc_after = _hidden(out, zoo, seed)
        found = report.verdict.status == "backdoor_suspected"
        flagged.append(found)
        for name, value in (("flagged", found), ("own_asr", own), ("asr_before", before),
                            ("asr_after", after), ("accuracy_before", acc_before),
                            ("accuracy_after", acc_after)):
            record_property(f"{seed}_{name}", round(value, 4))
        assert report.cleaning is not None
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.metadata()["mergeshield.cleaning"] == report.cleaning.status
        if not found:  # the precautionary repair: said so, nothing claimed removed
            assert report.cleaning.status == "precautionary", report.cleaning
            assert report.cleaning.unlearning  # the most suspicious inverted patch, unlearned
            assert after < before, (seed, before, after)
            continue
        assert after <= 0.4 * before, (seed, before, after)
        assert acc_before - acc_after <= 0.04, (seed, acc_before, acc_after)
        assert report.cleaning.unlearning
        assert (report.cleaning.status == "not_removed") == any(f.id == "MS003"
                                                                for f in report.findings)
    assert any(flagged), "the default scan flagged none of the three planted backdoors"
