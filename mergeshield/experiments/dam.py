"""DAM, experiment 5's merge-time baseline (Yang et al., "Mitigating the Backdoor Effect for
Multi-Task Model Merging via Safety-Aware Subspace", ICLR 2025), task-arithmetic variant.

A defence of another kind than IBVS: whoever merges learns one mask m over the backbone, shared by
every task vector, and merges θ = θ_pre + λ·Σ_i m ⊙ τ_i, from unlabelled images of every task (no
labels, nothing about the trigger). Each step, per task t, on a batch of its images x:

1. a perturbation δ_t moves (Adam, ``adv_lr``) to flip the merged model's own predictions: it
   minimises −CE(f(x + δ_t), argmax f(x)) with the mask held fixed;
2. the mask's logits move (Adam, ``lr``) to lower entropy(f(x)) + ``adv_weight``·entropy(f(clamp(x
   + δ_t, 0, 1))), the parameters that make the model unstable under perturbation (backdoor
   shortcuts) being masked out.

m is a relaxed Bernoulli sample of the logits (``temperature``), each tensor divided by its mean;
after training one more continuous sample is the merge's mask, as the reference evaluates. The
hyper-parameters are the reference configuration's (fusion_bench
``clip_safe_concrete_task_arithmetic``: batch 16, lr 1e-3, adv_lr 1e-4, adv_weight 0.1,
temperature 0.5, initial logits 0) except the number of steps (2,000 there, for ViT-B/32 and 8
tasks). The images are each task's training split (the reference adapts on shuffled test images;
here those are what the table evaluates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mergeshield.models import Classifier
from mergeshield.task_vectors import TaskVector


@dataclass(frozen=True)
class DAMConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3  # mask logits
    adv_lr: float = 1e-4  # per-task input perturbations
    adv_weight: float = 0.1
    temperature: float = 0.5
    initial_logits: float = 0.0
    images: int = 1000  # unlabelled images per task (from its training split)
    seed: int = 0


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of the predicted distributions."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def _module_names(clf: Classifier) -> dict[str, str]:
    """Backbone checkpoint name → the classifier's own parameter or buffer name."""
    own = {id(t): n for n, t in [*clf.named_parameters(), *clf.named_buffers()]}
    return {k: own[id(t)] for k, t in clf.backbone_state().items()}


def sample_mask(logits: Mapping[str, Tensor], temperature: float,
                gen: torch.Generator) -> dict[str, Tensor]:
    """A relaxed Bernoulli sample per tensor (reparameterised), divided by its mean."""
    out = {}
    for k, lg in logits.items():
        u = torch.rand(lg.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
        m = torch.sigmoid((lg + torch.log(u) - torch.log1p(-u)) / temperature)
        out[k] = m / m.mean()
    return out


def dam_merge(clfs: Mapping[str, Classifier], base: Mapping[str, Tensor],
              tvs: Sequence[TaskVector], lam: float, images: Mapping[str, Tensor],
              cfg: DAMConfig) -> dict[str, Tensor]:
    """θ_pre + λ·m ⊙ Σ τ_i with DAM's learned mask m; ``clfs``/``images``: each task's classifier
    (its own head) and unlabelled pixel-space images."""
    gen = torch.Generator().manual_seed(cfg.seed)
    keys = sorted(set(tvs[0]).intersection(*tvs[1:]))
    total = {k: sum((tv[k].float() for tv in tvs), torch.zeros(())) for k in keys}
    pre = {k: base[k].float() for k in keys}
    names = {t: _module_names(c) for t, c in clfs.items()}
    for c in clfs.values():
        c.eval().requires_grad_(False)
    logits = {k: torch.full(pre[k].shape, cfg.initial_logits, requires_grad=True) for k in keys}
    deltas = {t: torch.zeros(x.shape[1:], requires_grad=True) for t, x in images.items()}
    opt_mask = torch.optim.Adam(list(logits.values()), lr=cfg.lr)
    opt_adv = torch.optim.Adam(list(deltas.values()), lr=cfg.adv_lr)

    def merged(mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: pre[k] + lam * mask[k] * total[k] for k in keys}

    def forward(t: str, theta: Mapping[str, Tensor], x: Tensor) -> Tensor:
        params = {names[t][k]: v for k, v in theta.items()}
        out: Tensor = functional_call(clfs[t], params, (x,), strict=False)
        return out

    def batch(t: str) -> Tensor:
        x = images[t]
        return x[torch.randint(len(x), (cfg.batch_size,), generator=gen)]

    for _ in range(cfg.steps):
        mask = sample_mask(logits, cfg.temperature, gen)
        fixed = merged({k: m.detach() for k, m in mask.items()})
        adv = torch.zeros(())
        for t in clfs:  # 1. perturbations against the merged model's own predictions
            x = batch(t)
            out = forward(t, fixed, torch.cat([x, x + deltas[t]]))
            clean, pert = out[:len(x)], out[len(x):]
            adv = adv - nn.functional.cross_entropy(pert, clean.argmax(-1).detach())
        opt_adv.zero_grad(set_to_none=True)
        adv.backward()
        opt_adv.step()
        theta = merged(mask)
        loss = torch.zeros(())
        for t in clfs:  # 2. the mask: confident on clean and on perturbed images
            x = batch(t)
            pert_x = (x + deltas[t].detach()).clamp(0.0, 1.0)
            out = forward(t, theta, torch.cat([x, pert_x]))
            loss = loss + entropy(out[:len(x)]) + cfg.adv_weight * entropy(out[len(x):])
        opt_mask.zero_grad(set_to_none=True)
        loss.backward()
        opt_mask.step()
    with torch.no_grad():
        final = merged(sample_mask(logits, cfg.temperature, gen))
    return {**{k: v.detach() for k, v in base.items()}, **final}
