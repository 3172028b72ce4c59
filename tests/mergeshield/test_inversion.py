"""inversion.py: on a model with a planted 2×2 patch backdoor, inversion finds a working trigger."""

from __future__ import annotations

import pytest
import torch

from mergeshield.data import ImageDataset
from mergeshield.evaluation import attack_success_rate, clean_accuracy
from mergeshield.inversion import (
    InversionConfig,
    invert_blend,
    invert_blends,
    invert_triggers,
    invert_warps,
)
from mergeshield.training import FinetuneConfig, finetune
from mergeshield.triggers import (
    BlendedTrigger,
    ImageTrigger,
    PatchTrigger,
    Trigger,
    WarpTrigger,
    poison,
)
from tests.support.tiny import IMAGE, TinyNet, block_task

PLANTED = PatchTrigger(pattern="solid", size=2, location="bottom_right")  # rows/cols 13–14
CFG = InversionConfig(area_fraction=4 / (IMAGE * IMAGE), steps=100, batch=24, seed=0)


def planted(trigger: Trigger, target: int) -> tuple[TinyNet, ImageDataset]:
    """A 4-class classifier trained with 20% of its data stamped with ``trigger`` → ``target``;
    its held-out test set."""
    train, test = block_task(512, seed=0), block_task(200, seed=1)
    poisoned, _ = poison(train, trigger, target=target, rate=0.2, seed=0)
    clf = TinyNet(4)
    finetune(clf, poisoned, FinetuneConfig(epochs=20, batch_size=64, lr=1e-2), train_head=True)
    return clf, test


@pytest.fixture(scope="module")
def backdoored() -> tuple[TinyNet, ImageDataset]:
    """PLANTED → class 0."""
    clf, test = planted(PLANTED, 0)
    assert clean_accuracy(clf, test).rate > 0.95
    assert attack_success_rate(clf, test, PLANTED, 0).rate > 0.95
    return clf, test


@pytest.fixture(scope="module")
def inverted(backdoored: tuple[TinyNet, ImageDataset]) -> list[ImageTrigger]:
    clf, test = backdoored
    return invert_triggers(clf, test.images, test.labels, 4, CFG)


def test_one_trigger_per_class_with_exactly_the_area_budget(inverted: list[ImageTrigger]) -> None:
    assert len(inverted) == 4
    for trig in inverted:
        assert trig.mask is not None
        mask = torch.tensor(trig.mask)
        assert mask.shape == (IMAGE, IMAGE)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert int(mask.sum()) == 4  # round(4/256 · 16 · 16)
        pattern = torch.tensor(trig.pattern)
        assert pattern.shape == (1, IMAGE, IMAGE) and 0 <= pattern.min() <= pattern.max() <= 1


def test_the_trigger_for_the_planted_target_works(
    backdoored: tuple[TinyNet, ImageDataset], inverted: list[ImageTrigger],
) -> None:
    clf, test = backdoored
    asr = [attack_success_rate(clf, test, trig, target).rate
           for target, trig in enumerate(inverted)]
    assert asr[0] > 0.8, asr
    assert max(asr[1:]) < 0.5, asr  # the clean targets need more than 4 pixels
    rows, cols = torch.nonzero(torch.tensor(inverted[0].mask), as_tuple=True)
    assert int(rows.min()) >= 12 and int(cols.min()) >= 12  # it found the planted corner


def test_inversion_is_deterministic_for_a_seed(
    backdoored: tuple[TinyNet, ImageDataset], inverted: list[ImageTrigger],
) -> None:
    clf, test = backdoored
    again = invert_triggers(clf, test.images, test.labels, 4, CFG)
    assert again == inverted
    other = invert_triggers(clf, test.images, test.labels, 4,
                            InversionConfig(area_fraction=CFG.area_fraction, steps=20, seed=1))
    assert other != inverted


def test_area_budget_is_at_least_one_pixel(backdoored: tuple[TinyNet, ImageDataset]) -> None:
    clf, test = backdoored
    tiny = InversionConfig(area_fraction=1e-6, steps=2, batch=4, seed=0)
    out = invert_triggers(clf, test.images[:20], test.labels[:20], 4, tiny)
    assert all(int(torch.tensor(t.mask).sum()) == 1 for t in out)


BLENDED = BlendedTrigger(pattern="noise", alpha=0.2, seed=3)


@pytest.fixture(scope="module")
def blend_backdoored() -> tuple[TinyNet, ImageDataset]:
    """BLENDED → class 2."""
    clf, test = planted(BLENDED, 2)
    assert attack_success_rate(clf, test, BLENDED, 2).rate > 0.9
    return clf, test


def test_the_faint_blend_search_finds_the_blended_target(
    blend_backdoored: tuple[TinyNet, ImageDataset],
) -> None:
    """What the scan's blend search measures: one full-image pattern per target at a faint α; the
    planted target answers it far more than the others."""
    clf, test = blend_backdoored
    blends = invert_blends(clf, test.images, test.labels, range(4), CFG, alpha=0.1)
    assert all(torch.tensor(b.mask).unique().tolist() == [pytest.approx(0.1)] for b in blends)
    asr = [attack_success_rate(clf, test, b, t).rate for t, b in enumerate(blends)]
    assert asr[2] > 0.8 and asr[2] - max(asr[:2] + asr[3:]) > 0.3, asr


def test_the_repairs_blend_reaches_its_target(
    blend_backdoored: tuple[TinyNet, ImageDataset],
) -> None:
    """``invert_blend`` (what the repair unlearns, at α = 0.2) towards one suspected target."""
    clf, test = blend_backdoored
    one = invert_blend(clf, test.images, test.labels, 2, InversionConfig(steps=30, seed=4),
                       alpha=0.2)
    assert torch.tensor(one.mask).unique().tolist() == [pytest.approx(0.2)]
    assert attack_success_rate(clf, test, one, 2).rate > 0.9


@pytest.fixture(scope="module")
def clean_twin() -> TinyNet:
    """The same task trained on clean data: what a backdoored model's base answers."""
    clf = TinyNet(4)
    finetune(clf, block_task(512, seed=0), FinetuneConfig(epochs=20, batch_size=64, lr=1e-2),
             train_head=True)
    return clf


def test_a_differential_search_finds_what_only_the_suspect_answers(
    backdoored: tuple[TinyNet, ImageDataset], clean_twin: TinyNet,
) -> None:
    """``contrast``: the trigger must flip the suspect while the clean model keeps the true
    label; the planted corner does both, so the search still finds it, and the clean model
    ignores what it found."""
    clf, test = backdoored
    found = invert_triggers(clf, test.images, test.labels, 4, CFG, contrast=clean_twin)
    on_suspect = attack_success_rate(clf, test, found[0], 0).rate
    on_clean = attack_success_rate(clean_twin, test, found[0], 0).rate
    assert on_suspect > 0.8 and on_clean < 0.2, (on_suspect, on_clean)
    blends = invert_blends(clf, test.images, test.labels, [0], CFG, alpha=0.1,
                           contrast=clean_twin)
    assert (attack_success_rate(clf, test, blends[0], 0).rate
            >= attack_success_rate(clean_twin, test, blends[0], 0).rate)


def test_a_search_leaves_the_models_weights_as_they_were(
    backdoored: tuple[TinyNet, ImageDataset], clean_twin: TinyNet,
) -> None:
    """Searches optimise pixels only: no weight gradient is kept and every weight that was
    trainable before is trainable after (the repair trains the same model next)."""
    clf, test = backdoored
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    for m in (clf, clean_twin):
        m.requires_grad_(True).zero_grad(set_to_none=True)  # trainable, as while repairing
    clf.classifier.weight.requires_grad_(False)  # a frozen weight stays frozen
    try:
        invert_triggers(clf, test.images[:40], test.labels[:40], 4,
                        InversionConfig(steps=4, batch=4), contrast=clean_twin)
        assert all(p.grad is None for p in clf.parameters())
        assert all(p.grad is None for p in clean_twin.parameters())
        frozen = [n for n, p in clf.named_parameters() if not p.requires_grad]
        assert frozen == ["classifier.weight"]
        assert all(p.requires_grad for p in clean_twin.parameters())
        assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())
    finally:
        for m in (clf, clean_twin):
            m.requires_grad_(False)  # as training left them, for the module's other tests


# -- the warp search ------------------------------------------------------------------------------
def _a_warp(shift: float, seed: int) -> WarpTrigger:
    """A WaNet-like smooth warp: 4 × 4 random control offsets of at most ``shift`` pixels."""
    offsets = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return WarpTrigger(offsets=(offsets * shift).tolist())


@pytest.fixture(scope="module")
def warp_backdoored() -> tuple[TinyNet, ImageDataset]:
    """20 % of the rows warped by one fixed smooth warp (2.5 px) → class 3."""
    train, test = block_task(512, seed=0), block_task(200, seed=1)
    poisoned, _ = poison(train, _a_warp(2.5, seed=7), target=3, rate=0.2, seed=0)
    clf = TinyNet(4)
    finetune(clf, poisoned, FinetuneConfig(epochs=20, batch_size=64, lr=1e-2), train_head=True)
    assert attack_success_rate(clf, test, _a_warp(2.5, seed=7), 3).rate > 0.9
    return clf, test


def test_the_warp_search_finds_the_warped_target_and_not_on_a_clean_twin(
    warp_backdoored: tuple[TinyNet, ImageDataset], clean_twin: TinyNet,
) -> None:
    """What a warping backdoor answers: one smooth warp of a pixel or two sends every image to
    the target (a fainter warp than the planted 2.5 px suffices); on a clean model of the task
    no target is reached by a warp that small (2.5 px reaches one here: a 16-px image). The
    found warps stay within their bound (bicubic overshoots the control points a little)."""
    clf, test = warp_backdoored
    cfg = InversionConfig(steps=60, batch=24, seed=0)
    found = invert_warps(clf, test.images, test.labels, range(4), cfg, 1.5)
    assert all(float(torch.tensor(f.offsets).abs().max()) <= 1.5 for f in found)
    asr = [attack_success_rate(clf, test, f, t).rate for t, f in enumerate(found)]
    assert asr[3] > 0.8 and asr[3] - max(asr[:3]) > 0.3, asr
    twins = invert_warps(clean_twin, test.images, test.labels, range(4), cfg, 1.5)
    twin = [attack_success_rate(clean_twin, test, f, t).rate for t, f in enumerate(twins)]
    assert max(twin) < 0.5, twin
