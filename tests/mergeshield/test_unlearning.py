"""Found-trigger unlearning: the stamped set keeps every label; a repair removes a planted trigger
from a zoo model, stops when nothing responds, and undoes a round that breaks the budget."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mergeshield import checkpoints
from mergeshield.data import ImageDataset, load_task
from mergeshield.evaluation import attack_success_rate, clean_accuracy
from mergeshield.inversion import InversionConfig
from mergeshield.models import family_for
from mergeshield.report.verdict import still_responds
from mergeshield.triggers import BlendedTrigger, PatchTrigger, parse_trigger
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


def test_repair_removes_the_planted_trigger_and_reports_each_round(zoo: Zoo) -> None:
    """The zoo's BadNets model, its own trigger given as found: one round takes it below the
    verdict's residual rule and the loop stops there."""
    name = "vit-mnist-badnets"
    m = zoo.model(name)
    base_src = checkpoints.resolve(str(zoo.path(m["base"])))
    src = checkpoints.resolve(str(zoo.path(name)))
    fam = family_for(base_src.config, src.config)
    with checkpoints.open_checkpoint(base_src) as b, checkpoints.open_checkpoint(src) as s:
        base, sus = dict(fam.canonical(b)), dict(fam.canonical(s))
    task = load_task(str(zoo.dataset(name)), max_test=500, seed=0)
    clf = fam.classifier(sus, fam.head_from(base, sus), task.test.classes)
    trigger, target = parse_trigger(m["attack"]["trigger"]), m["attack"]["target"]
    before = attack_success_rate(clf, task.test, trigger, target).rate
    ca = clean_accuracy(clf, task.test).rate
    rows = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))
    train = task.train.subset(rows[:1000])  # a random draw: the rows are stored by class
    rounds = repair(clf, train, task.test, task.train.subset(rows[1000:1256]),
                    [Found("probe:planted", trigger, target, 0.05)],
                    UnlearnConfig(rounds=3), still_responds=partial(still_responds),
                    inversion=InversionConfig(steps=20), accuracy_floor=ca - 0.05)
    after = attack_success_rate(clf, task.test, trigger, target).rate
    assert before > 0.8 and after < 0.2, (before, after)
    assert 1 <= len(rounds) <= 3
    last = rounds[-1]
    assert "probe:planted" in last.unlearned and any(u.startswith("round0:blend") for u in
                                                     rounds[0].unlearned)
    assert {"probe:planted", f"reinverted:target-{target}"} <= set(last.residual)
    if len(rounds) < 3:  # stopped early: because nothing responded any more
        assert not still_responds(last.residual["probe:planted"].rate, 0.05)
    assert clean_accuracy(clf, task.test).rate >= ca - 0.05
