"""Classic backdoor repairs, each on the defender's clean data only (the budget every defence gets).

- Fine-tuning: the backbone fine-tuned on the clean data.
- Fine-pruning (Liu et al., RAID 2018): prune the last block's MLP neurons least active on clean
  data, in increasing order, while clean accuracy on held-out defender rows drops ≤ ``prune_drop``,
  then fine-tune (the pruned neurons are zeroed again after it, so they stay pruned).
- Neural-Cleanse unlearning (Wang et al., S&P 2019): invert one small trigger per class
  (``inversion.invert_triggers``), take the class it flips most easily, stamp that trigger on a
  fraction of the clean rows *keeping their true labels*, and fine-tune on that.
- ANP (Wu & Wang, NeurIPS 2021): learn a mask m ∈ [0, 1] per MLP neuron of every block that keeps
  the clean loss low even under an adversarial multiplicative perturbation δ ∈ [−ε, ε], then prune
  by fraction (ANP's second rule): smallest masks first, while held-out accuracy drops ≤
  ``prune_drop``. Neurons here are the MLP hidden units (transformers have no BatchNorm); the
  perturbation scales the unit's pre-activation by (m + δ). 100 steps, not ANP's 2,000 (2 cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mergeshield.efficacy.attacks import apply
from mergeshield.efficacy.world import Backbone, World
from mergeshield.evaluation import clean_accuracy, predict
from mergeshield.inversion import InversionConfig, invert_triggers
from mergeshield.models import Classifier
from mergeshield.training import FinetuneConfig


@dataclass(frozen=True)
class RepairConfig:
    finetune: FinetuneConfig = FinetuneConfig(epochs=5, lr=1e-3)  # every repair's fine-tune
    holdout: int = 500  # last defender rows: the accuracy check of fine-pruning
    prune_step: float = 0.05  # fraction of the layer's neurons pruned per step
    prune_drop: float = 0.02  # accuracy drop that stops fine-pruning
    unlearn_fraction: float = 0.2  # clean rows stamped with the inverted trigger (true labels)
    anp_steps: int = 100
    anp_batch: int = 128
    anp_eps: float = 0.4  # ANP's ε
    anp_alpha: float = 0.2  # weight of the unperturbed clean loss
    anp_lr: float = 0.2
    anp_threshold: float = 0.2  # reported: how many masks ended below ANP's threshold


def _mlp_inputs(clf: Classifier) -> list[nn.Linear]:
    """The first Linear of every block's MLP (ViT ``intermediate.dense``, CLIP ``mlp.fc1``)."""
    return [m for n, m in clf.named_modules() if isinstance(m, nn.Linear)
            and (n.endswith("intermediate.dense") or n.endswith("mlp.fc1"))]


def _prune(layer: nn.Linear, idx: Tensor) -> None:
    with torch.no_grad():
        layer.weight[idx] = 0.0
        if layer.bias is not None:
            layer.bias[idx] = 0.0


def _backbone(world: World, clf: Classifier) -> Backbone:
    state = clf.backbone_state()
    return {k: state[k].detach().clone() for k in world.keys}


def fine_tune(world: World, task: str, backbone: Backbone, seed: int,
              cfg: RepairConfig = RepairConfig()) -> tuple[Backbone, dict[str, Any]]:
    return world.finetune(task, world.defender(task), seed, backbone, cfg.finetune), {}


def _prune_while(world: World, task: str, backbone: Backbone, order: list[tuple[int, int]],
                 cfg: RepairConfig) -> tuple[Classifier, int]:
    """Prune (layer, neuron) pairs of ``order`` in steps while the accuracy on the held-out
    defender rows drops ≤ ``prune_drop``; the suspect with the accepted prefix pruned."""
    data = world.defender(task)
    check = data.subset(slice(len(data) - cfg.holdout, len(data)))
    base_acc = clean_accuracy(world.classifier(task, backbone), check).rate
    step, pruned = max(1, round(cfg.prune_step * len(order))), 0
    while pruned < len(order):
        trial = world.classifier(task, backbone)
        _prune_pairs(trial, order[:pruned + step])
        if base_acc - clean_accuracy(trial, check).rate > cfg.prune_drop:
            break
        pruned = min(len(order), pruned + step)
    out = world.classifier(task, backbone)
    _prune_pairs(out, order[:pruned])
    return out, pruned


def _prune_pairs(clf: Classifier, pairs: list[tuple[int, int]]) -> None:
    layers = _mlp_inputs(clf)
    for i, layer in enumerate(layers):
        _prune(layer, torch.tensor([n for j, n in pairs if j == i], dtype=torch.long))


def fine_prune(world: World, task: str, backbone: Backbone, seed: int,
               cfg: RepairConfig = RepairConfig()) -> tuple[Backbone, dict[str, Any]]:
    data = world.defender(task)
    clf = world.classifier(task, backbone)
    last = len(_mlp_inputs(clf)) - 1
    acts: list[Tensor] = []
    hook = _mlp_inputs(clf)[last].register_forward_hook(
        lambda _m, _i, out: acts.append(nn.functional.gelu(out).mean((0, 1))))
    predict(clf, data.images)
    hook.remove()
    order = [(last, int(n)) for n in torch.stack(acts).mean(0).argsort()]  # least active first
    pruned_clf, pruned = _prune_while(world, task, backbone, order, cfg)
    tuned = world.finetune(task, data, seed, _backbone(world, pruned_clf), cfg.finetune)
    final = world.classifier(task, tuned)
    _prune_pairs(final, order[:pruned])  # pruned neurons stay pruned
    return _backbone(world, final), {"pruned": pruned, "neurons": len(order)}


def nc_unlearn(world: World, task: str, backbone: Backbone, seed: int,
               cfg: RepairConfig = RepairConfig()) -> tuple[Backbone, dict[str, Any]]:
    data = world.defender(task)
    clf = world.classifier(task, backbone)
    k = len(data.classes)
    found = invert_triggers(clf, data.images, data.labels, k, InversionConfig(seed=seed))
    rates = []
    for t, trig in enumerate(found):
        keep = data.labels != t
        rates.append(float((predict(clf, apply(trig, data.images[keep])) == t).float().mean()))
    target = max(range(k), key=rates.__getitem__)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(data), generator=g)[:round(cfg.unlearn_fraction * len(data))]
    images = data.images.clone()
    images[rows] = apply(found[target], images[rows])  # labels stay true: unlearn the shortcut
    unlearn = type(data)(images, data.labels, data.classes, f"{data.name}+unlearn")
    tuned = world.finetune(task, unlearn, seed, backbone, cfg.finetune)
    return tuned, {"target": target, "inverted_asr": round(rates[target], 4)}


def anp(world: World, task: str, backbone: Backbone, seed: int,
        cfg: RepairConfig = RepairConfig()) -> tuple[Backbone, dict[str, Any]]:
    data = world.defender(task)
    clf = world.classifier(task, backbone)
    layers = _mlp_inputs(clf)
    masks = [torch.ones(m.out_features, requires_grad=True) for m in layers]
    noise = [torch.zeros(m.out_features, requires_grad=True) for m in layers]
    perturb = [False]

    def scale(i: int) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Tensor) -> Tensor:
            return out * (masks[i] + (noise[i] if perturb[0] else 0.0))
        return hook

    hooks = [m.register_forward_hook(scale(i)) for i, m in enumerate(layers)]
    opt = torch.optim.SGD(masks, lr=cfg.anp_lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.functional.cross_entropy
    clf.eval()
    with torch.enable_grad():
        for _ in range(cfg.anp_steps):
            idx = torch.randint(len(data), (cfg.anp_batch,), generator=g)
            x, y = data.images[idx], data.labels[idx]
            for d in noise:  # random start, then one signed step that raises the loss
                with torch.no_grad():
                    d.uniform_(-cfg.anp_eps, cfg.anp_eps, generator=g)
            perturb[0] = True
            grads = torch.autograd.grad(loss_fn(clf(x), y), noise)
            with torch.no_grad():
                for d, gr in zip(noise, grads, strict=True):
                    d.add_(cfg.anp_eps * gr.sign()).clamp_(-cfg.anp_eps, cfg.anp_eps)
            robust = loss_fn(clf(x), y)
            perturb[0] = False
            loss = cfg.anp_alpha * loss_fn(clf(x), y) + (1 - cfg.anp_alpha) * robust
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0.0, 1.0)
    for h in hooks:
        h.remove()
    flat = torch.cat([m.detach() for m in masks])  # every neuron's mask, layer by layer
    pairs = [(i, n) for i, m in enumerate(masks) for n in range(len(m))]
    order = [pairs[int(j)] for j in flat.argsort()]  # smallest mask first
    pruned_clf, pruned = _prune_while(world, task, backbone, order, cfg)
    below = int((flat < cfg.anp_threshold).sum())
    return _backbone(world, pruned_clf), {"pruned": pruned, "below_threshold": below,
                                          "neurons": len(pairs)}
