"""Model family adapters: one per family, each knowing its backbone, preprocessing and logits.

transformers is imported where a model (or its config) is built, not when this package is: the
arithmetic (`bv compute`, `merge`, sanitising, a scan's task vector) reads config.json through
these checks and never needs it (~3 s of every such process; tests/mergeshield/test_imports.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mergeshield.errors import IncompatibleModelsError, UnsupportedModelError
from mergeshield.models.base import Classifier, ModelFamily, PrefixedWeights, Preprocessing
from mergeshield.models.clip import CLIPFamily
from mergeshield.models.config_guard import (
    MAX_PARAMETERS,
    check_parameters,
    check_size,
    refuse_remote_code,
)
from mergeshield.models.hf_image import HFImageFamily

__all__ = [
    "CLIPFamily",
    "Classifier",
    "HFImageFamily",
    "MAX_PARAMETERS",
    "ModelFamily",
    "PrefixedWeights",
    "Preprocessing",
    "backbone_keys",
    "check_config",
    "family_for",
]


def check_config(
    config: Mapping[str, Any],
    *,
    weight_elements: int | None = None,
    max_parameters: int = MAX_PARAMETERS,
) -> None:
    """Refuse a config.json before any model is built from it: remote code at any depth,
    wrong-typed or out-of-range fields, more parameters than ``max_parameters``, or (for a
    family we can build) a backbone larger than the ``weight_elements`` on disk."""
    refuse_remote_code(config, "config.json")
    check_size(config, max_parameters)
    counts: tuple[int, int] | None = None
    if CLIPFamily.matches(config):
        counts = CLIPFamily.parameter_counts(config, max_parameters)
    elif HFImageFamily.matches(config):
        counts = HFImageFamily.parameter_counts(config, max_parameters)[:2]
    if counts is not None:
        check_parameters(counts[0], backbone=counts[1], weight_elements=weight_elements,
                         max_parameters=max_parameters)


def family_for(
    base_config: Mapping[str, Any] | None,
    suspect_config: Mapping[str, Any] | None,
    *,
    processor: Mapping[str, Any] | None = None,
    tokenizer_root: str | None = None,
    max_parameters: int = MAX_PARAMETERS,
) -> ModelFamily:
    """The adapter that can run ``suspect`` against ``base``; UnsupportedModelError if none can.

    The CLIP family is built from the base (its text tower makes the zero-shot head); image
    classifiers from the suspect's config (its head size).
    """
    if not base_config or not suspect_config:
        raise UnsupportedModelError(
            "config.json is missing, so no model family can run a forward pass; only "
            "architecture-agnostic statistics are computed"
        )
    if CLIPFamily.matches(suspect_config) and CLIPFamily.matches(base_config):
        return CLIPFamily(base_config, processor, tokenizer_root, max_parameters=max_parameters)
    if HFImageFamily.matches(suspect_config):
        return HFImageFamily(suspect_config, processor, max_parameters=max_parameters)
    raise UnsupportedModelError(
        f"no adapter for model_type {suspect_config.get('model_type')!r} "
        f"(architectures {suspect_config.get('architectures')}); supported: transformers image "
        "classifiers and CLIP"
    )


def backbone_keys(
    family: ModelFamily | None, base: Mapping[str, Tensor], suspect: Mapping[str, Tensor]
) -> tuple[list[str], list[tuple[str, str]]]:
    """The tensors task vectors cover, and every other tensor of the suspect with the reason.

    Known family: its backbone tensors (must all be in the base, and every float one of the
    base must be a float in the suspect). Unknown family: every float tensor the two checkpoints
    share with equal shape; the rest is listed as skipped. Float precisions may differ (a bf16
    fine-tune of an fp32 base): task vectors are computed in float32.
    """
    keys: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in suspect:
        info = _info(suspect, name)
        if not info.dtype.is_floating_point:
            skipped.append((name, f"non-float dtype {str(info.dtype).removeprefix('torch.')}"))
        elif family is not None and not family.is_backbone(name):
            skipped.append((name, "head (per task, not part of the task vector)"))
        elif family is None and name not in base:
            skipped.append((name, "not in the base model"))
        elif family is None and not _same(_info(base, name), info):
            skipped.append((name, "shape or dtype kind differs from the base (a head?)"))
        else:
            keys.append(name)
    if family is not None:  # a backbone tensor of the base that the suspect lacks is a mismatch
        have = set(suspect)
        lost = [k for k in base if family.is_backbone(k) and k not in have
                and _info(base, k).dtype.is_floating_point]
        not_float = [{"name": k, "base": str(_info(base, k).dtype), "other": str(i.dtype)}
                     for k in base if k in have and family.is_backbone(k)
                     and _info(base, k).dtype.is_floating_point
                     and not (i := _info(suspect, k)).dtype.is_floating_point]
        if not_float:  # a weight stored as integers is not a fine-tune of a float weight
            raise IncompatibleModelsError(
                f"{len(not_float)} backbone tensor(s) are floats in the base but not in the "
                f"other model, e.g. {[d['name'] for d in not_float[:3]]}",
                details={"missing": [], "unexpected": [], "shape": [], "dtype": not_float},
            )
        if lost:
            raise IncompatibleModelsError(
                f"{len(lost)} backbone tensor(s) of the base are missing from the other model, "
                f"e.g. {lost[:3]}: is this the right base model?",
                details={"missing": lost, "unexpected": [], "shape": [], "dtype": []},
            )
    if not keys:
        raise IncompatibleModelsError(
            "the suspect and the base share no backbone tensor: is this the right base model?",
            details={"skipped": skipped[:50]},
        )
    return keys, skipped


def _same(a: Any, b: Any) -> bool:
    """Same shape, and both floats (any precision) or the same dtype."""
    same_kind = a.dtype == b.dtype or (a.dtype.is_floating_point and b.dtype.is_floating_point)
    return bool(same_kind and tuple(a.shape) == tuple(b.shape))


def _info(weights: Mapping[str, Tensor], name: str) -> Any:
    info = getattr(weights, "info", None)
    if info is not None:
        return info(name)
    t = weights[name]
    return _TensorInfo(t.dtype, tuple(t.shape))


class _TensorInfo(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
