"""training.py: batch order, frozen heads, bit-exact reproducibility, paired fine-tunes, probes."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator

import pytest
import torch

from mergeshield.evaluation import clean_accuracy
from mergeshield.models import Classifier, HFImageFamily, family_for
from mergeshield.training import (
    FinetuneConfig,
    autocast,
    batch_order,
    finetune,
    fit_head,
    paired_finetune,
)
from mergeshield.triggers import PatchTrigger, poison
from tests.support.tiny import TinyNet, block_task, load_dir, save_vit

QUICK = FinetuneConfig(epochs=2, batch_size=32, lr=1e-2, seed=0)


@pytest.fixture(scope="module")
def vit_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Classifier]:
    """Fresh copies of a tiny saved ViT (3 classes, 16×16 grey), built by the real adapter."""
    ck = load_dir(save_vit(tmp_path_factory.mktemp("vit")))
    family = family_for(ck.config, ck.config)
    assert isinstance(family, HFImageFamily)
    return lambda: family.classifier(ck, ck, ("c0", "c1", "c2"))


def state(clf: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in clf.state_dict().items()}


# -- batch order ----------------------------------------------------------------------------------
def test_batch_order_is_seeded_and_each_epoch_is_a_permutation() -> None:
    cfg = FinetuneConfig(epochs=3, batch_size=32, seed=4)
    a, b = batch_order(100, cfg), batch_order(100, cfg)
    assert len(a) == 3 * 4 and [len(x) for x in a[:4]] == [32, 32, 32, 4]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for e in range(3):
        assert torch.cat(a[4 * e: 4 * e + 4]).sort().values.tolist() == list(range(100))
    other = batch_order(100, FinetuneConfig(epochs=3, batch_size=32, seed=5))
    assert not all(torch.equal(x, y) for x, y in zip(a, other, strict=True))


@pytest.mark.parametrize(("min_steps", "steps"), [(0, 4), (4, 4), (5, 8), (10, 12), (12, 12)])
def test_min_steps_adds_whole_epochs(min_steps: int, steps: int) -> None:
    cfg = FinetuneConfig(epochs=1, batch_size=32, min_steps=min_steps)
    assert len(batch_order(100, cfg)) == steps


# -- fine-tuning ----------------------------------------------------------------------------------
def test_finetune_moves_the_backbone_and_leaves_the_head_bit_identical(
    vit_factory: Callable[[], Classifier],
) -> None:
    clf = vit_factory()
    head = {k: v.clone() for k, v in clf.head().state_dict().items()}
    before = {k: v.detach().clone() for k, v in clf.backbone_state().items()}
    everything = state(clf)
    out = finetune(clf, block_task(64, n_classes=3), QUICK)
    assert all(torch.equal(clf.head().state_dict()[k], v) for k, v in head.items())
    assert out.keys() == before.keys()
    moved = [k for k in before if not torch.equal(out[k], before[k])]
    assert len(moved) >= 0.8 * len(before)  # (a few tensors, e.g. unused CLS paths, may stay)
    backbone_ids = {id(t) for t in clf.backbone_state().values()}
    named = dict(clf.named_parameters())
    for name, t in state(clf).items():  # everything outside the backbone is untouched
        if name in named and id(named[name]) in backbone_ids:
            continue
        assert torch.equal(t, everything[name]), name
    live = clf.backbone_state()
    assert all(torch.equal(out[k], live[k]) and out[k].data_ptr() != live[k].data_ptr()
               for k in out)  # the returned backbone is a copy
    assert not any(p.requires_grad for p in clf.parameters())


def test_finetune_with_train_head_moves_the_head() -> None:
    clf = TinyNet(4)
    w = clf.head().weight.detach().clone()  # type: ignore[operator]
    finetune(clf, block_task(64), QUICK, train_head=True)
    assert not torch.equal(clf.head().weight, w)  # type: ignore[arg-type]


def test_two_runs_with_the_same_seed_are_bit_identical() -> None:
    data = block_task(96)
    runs = [finetune(TinyNet(4), data, QUICK) for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = finetune(TinyNet(4), data, FinetuneConfig(epochs=2, batch_size=32, lr=1e-2, seed=1))
    assert not all(torch.equal(runs[0][k], other[k]) for k in runs[0])


def test_finetune_follows_a_given_order_and_reports_progress() -> None:
    seen: list[tuple[str, float]] = []
    data = block_task(64)
    order = [torch.arange(0, 32), torch.arange(32, 64)]
    finetune(TinyNet(4), data, QUICK, order=order, stage="s",
             progress=lambda s, f: seen.append((s, f)))
    assert seen == [("s", 0.5), ("s", 1.0)]


def test_paired_finetune_on_identical_data_gives_an_exactly_zero_bv(
    vit_factory: Callable[[], Classifier],
) -> None:
    data = block_task(64, n_classes=3)
    clean, bd = paired_finetune(vit_factory, data, data, QUICK)
    assert clean.keys() == bd.keys()
    assert all(torch.equal(clean[k], bd[k]) for k in clean)
    poisoned, _ = poison(data, PatchTrigger(size=2), target=0, rate=0.25, seed=0)
    clean2, bd2 = paired_finetune(vit_factory, data, poisoned, QUICK)
    assert all(torch.equal(clean[k], clean2[k]) for k in clean)  # the clean side is reproducible
    assert not all(torch.equal(clean2[k], bd2[k]) for k in clean2)


def test_paired_finetune_refuses_sets_of_different_sizes() -> None:
    with pytest.raises(ValueError):
        paired_finetune(lambda: TinyNet(4), block_task(64), block_task(32), QUICK)


def test_fit_head_learns_a_linear_probe_on_frozen_features() -> None:
    train, test = block_task(256, seed=0), block_task(128, seed=1)
    clf = TinyNet(4)
    backbone = {k: v.detach().clone() for k, v in clf.backbone_state().items()}
    before = clean_accuracy(clf, test)
    fit_head(clf, train, epochs=60, lr=5e-2, seed=0)
    after = clean_accuracy(clf, test)
    assert before.rate < 0.6 < 0.9 < after.rate, (before, after)
    assert all(torch.equal(v, clf.backbone_state()[k]) for k, v in backbone.items())
    assert not any(p.requires_grad for p in clf.head().parameters())


@pytest.fixture
def fresh_mergeshield() -> Iterator[None]:
    """Forget every loaded mergeshield module for the test, and put the originals back after."""
    def ours(name: str) -> bool:
        return name == "mergeshield" or name.startswith("mergeshield.")

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    try:
        yield
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.usefixtures("fresh_mergeshield")
def test_training_module_imports_first() -> None:
    importlib.import_module("mergeshield.training")  # as `python -c "import mergeshield.training"`


def test_autocast_is_off_on_the_cpu() -> None:
    """One training loop for both devices: bf16 autocast on CUDA only, so the CPU's numbers stay
    float32 (no GPU here: the CUDA side is exercised where one is present)."""
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
