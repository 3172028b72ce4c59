"""The attacks MergeShield's defences are evaluated against (method.md, "Attacks").

- BadNets (``badnets``): an s×s patch (solid, checkerboard or random; default 3 px checkerboard,
  bottom right) stamped on ρ = 10% of the training set, drawn from non-target classes and
  relabelled to the target.
- Blended (``blended``): a full-image pattern mixed with α = 0.15 (range 0.1–0.2), same ρ.
- BadMerging-On (``badmerging``, Zhang et al. CCS 2024): a universal adversarial patch optimised on
  the pre-trained model (bottom right, ~1% of the area) and backdoor fine-tuning with α = 5 × a CE
  loss on triggered copies whose features are r·f_ft + (1 − r)·f_pre, r ~ U(0.2, 1.0).
- SBV (``sbv``, arXiv:2510.08016): Σ_k BV_k of same-target BVs, top p = 20% entries (global),
  rescaled to ‖mean BV‖; SBV_SC elects signs first; λ_SBV keeps clean accuracy within 1 point.
- Inherent triggers (``inherent``): universal adversarial patches of the *base* model, with a
  same-size random patch as the control.

Each attack is a pure function over the library's types (``ImageDataset``, ``Trigger``,
``TaskVector``, backbone ``dict[str, Tensor]``): no paths, no printing.
"""

from mergeshield.attacks.badmerging import badmerging_finetune, head_features
from mergeshield.attacks.badnets import badnets, badnets_trigger
from mergeshield.attacks.blended import blended, blended_trigger
from mergeshield.attacks.inherent import inherent_patch, random_patch, universal_patch
from mergeshield.attacks.sbv import LambdaChoice, choose_lambda_sbv, sbv

__all__ = [
    "LambdaChoice",
    "badmerging_finetune",
    "badnets",
    "badnets_trigger",
    "blended",
    "blended_trigger",
    "choose_lambda_sbv",
    "head_features",
    "inherent_patch",
    "random_patch",
    "sbv",
    "universal_patch",
]
