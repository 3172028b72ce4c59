"""Hugging Face ``AutoModelForImageClassification`` models: ViT, DeiT, ConvNeXt, ResNet, ...

The backbone is everything under the model's ``base_model_prefix`` (``vit.``, ``convnext.``, ...);
the classification head (``classifier.*``) is per task and excluded from task vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from mergeshield.errors import (
    CorruptCheckpointError,
    DatasetError,
    IncompatibleModelsError,
    UnsupportedModelError,
)
from mergeshield.models.base import Classifier, ModelFamily, PrefixedWeights, Preprocessing
from mergeshield.models.config_guard import (
    MAX_IMAGE_SIDE,
    MAX_PARAMETERS,
    attention_for,
    check_parameters,
    check_size,
    count_on_meta,
    refuse_remote_code,
    sanitised,
)

if TYPE_CHECKING:  # transformers is imported where a model is built (the package docstring)
    from transformers import PreTrainedModel


def _build(config: Mapping[str, Any], num_labels: int) -> PreTrainedModel:
    """The model of a *checked* config (``check_fields``): sanitised, our attention, float32."""
    from transformers import AutoConfig, AutoModelForImageClassification

    cfg = {k: v for k, v in sanitised(config).items() if k != "architectures"}
    cfg["num_labels"] = num_labels
    cfg.pop("id2label", None)
    cfg.pop("label2id", None)
    hf_config = AutoConfig.for_model(**cfg)
    # some model types map to several classes (DeiT: plain, and with a distillation teacher):
    # the one the config names, else the first
    mapped = AutoModelForImageClassification._model_mapping[type(hf_config)]
    classes = [c for c in (mapped if isinstance(mapped, tuple) else (mapped,)) if c is not None]
    named = {str(a) for a in config.get("architectures") or []}
    model_class = next((c for c in classes if c.__name__ in named), classes[0])
    model: PreTrainedModel = model_class._from_config(
        hf_config, attn_implementation=attention_for(model_class))
    return model


class HFImageClassifier(Classifier):
    def __init__(self, model: PreTrainedModel, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.prefix = model.base_model_prefix + "."

    def logits(self, inputs: Tensor) -> Tensor:
        out: Tensor = self.model(pixel_values=inputs).logits
        return out

    def head(self) -> nn.Module:
        return _head_module(self.model)

    def backbone_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in _tensors(self.model).items() if k.startswith(self.prefix)}

    def checkpoint_state(self) -> dict[str, Tensor]:
        """Every float tensor under its checkpoint name (copies)."""
        return {k: v.detach().clone() for k, v in _tensors(self.model).items()}


def _tensors(model: PreTrainedModel) -> dict[str, Tensor]:
    """Parameters and float buffers under their *checkpoint* names, as live tensors."""
    live = {k: t for k, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}
    names = _checkpoint_names(model, live)
    return {names[k]: t for k, t in live.items()}


def _checkpoint_names(model: PreTrainedModel, live: dict[str, Tensor]) -> dict[str, str]:
    """Each live tensor's name in memory → its name in a checkpoint.

    transformers>=5 renames modules in memory (``vit.layers.0.attention.q_proj``) and converts
    back on save (``vit.encoder.layer.0.attention.attention.query``); task vectors are defined on
    the checkpoint names everyone shares, so we ask transformers for the same reversal.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers<5 keeps checkpoint names in memory
        return {k: k for k in live}
    reverted = revert_weight_conversion(model, dict(live))
    by_id = {id(t): name for name, t in reverted.items()}
    fused = [k for k, t in live.items() if id(t) not in by_id]
    if fused:
        raise UnsupportedModelError(
            f"{type(model).__name__} fuses or splits tensors between memory and checkpoint "
            f"(e.g. {fused[:2]}); only renamed tensors are supported"
        )
    return {k: by_id[id(t)] for k, t in live.items()}


def _head_module(model: nn.Module) -> nn.Module:
    for name in ("classifier", "head", "fc"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise UnsupportedModelError(f"cannot find the classification head of {type(model).__name__}")


class HFImageFamily(ModelFamily):
    """Any ``AutoModelForImageClassification`` architecture known to transformers."""

    name = "hf-image"

    def __init__(self, config: Mapping[str, Any], processor: Mapping[str, Any] | None, *,
                 max_parameters: int = MAX_PARAMETERS) -> None:
        self.config = dict(config)
        count, backbone, self.prefix = self.parameter_counts(self.config, max_parameters)
        check_parameters(count, backbone=backbone, weight_elements=None,
                         max_parameters=max_parameters)
        self.preprocessing = Preprocessing.from_config(
            processor,
            self.config.get("image_size") or _processor_size(processor),
            self.config.get("num_channels", 3),
        )

    @classmethod
    def parameter_counts(cls, config: Mapping[str, Any],
                         max_parameters: int = MAX_PARAMETERS) -> tuple[int, int, str]:
        """(parameters, backbone parameters, backbone prefix) of the model ``config`` builds,
        counted on the meta device after the config's checks; nothing is allocated."""
        refuse_remote_code(config, "config.json")
        check_size(config, max_parameters)
        count, model = count_on_meta(lambda: _build(config, 2))
        prefix = str(getattr(model, "base_model_prefix", "")) + "."
        backbone = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
        return count, backbone, prefix

    @classmethod
    def matches(cls, config: Mapping[str, Any]) -> bool:
        archs = config.get("architectures") or []
        if archs and not any(str(a).endswith("ForImageClassification") for a in archs):
            return False  # decided without transformers: a causal LM's config never imports it
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        )

        return config.get("model_type") in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    def is_backbone(self, name: str) -> bool:
        return name.startswith(self.prefix)

    def initial_weights(self, num_labels: int) -> dict[str, Tensor]:
        """A randomly initialised model's tensors under checkpoint names (to pre-train from)."""
        return {k: v.detach().clone() for k, v in _tensors(_build(self.config, num_labels)).items()}

    def checkpoint_names(self) -> dict[str, str]:
        """Tensor names in memory (what PEFT adapters use) → checkpoint names (built on the
        meta device: nothing is allocated)."""
        _, model = count_on_meta(lambda: _build(self.config, 2))
        live = {k: t for k, t in model.state_dict(keep_vars=True).items()
                if t.is_floating_point()}
        return _checkpoint_names(cast("PreTrainedModel", model), live)

    def canonical(self, weights: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        # A bare backbone checkpoint (e.g. ViTModel) lacks the prefix: add it.
        if any(k.startswith(self.prefix) for k in weights):
            return weights
        return PrefixedWeights(weights, self.prefix)

    def head_keys(self, weights: Mapping[str, Tensor]) -> list[str]:
        return [k for k in weights if not k.startswith(self.prefix)]

    def task_classifier(
        self, base: Mapping[str, Tensor], data: Any, *, device: torch.device, seed: int = 0
    ) -> Callable[[], HFImageClassifier]:
        """The base backbone with a linear-probe head fit on its frozen features."""
        from mergeshield.training import fit_head  # training imports models: keep this one lazy

        torch.manual_seed(seed)
        probe = self.classifier(base, None, data.classes).to(device)
        fit_head(probe, data, seed=seed)
        state = probe.checkpoint_state()
        return lambda: self.classifier(base, state, data.classes).to(device)

    def classifier(
        self,
        backbone: Mapping[str, Tensor],
        head_source: Mapping[str, Tensor] | None,
        classes: tuple[str, ...],
    ) -> HFImageClassifier:
        if head_source is None:  # a fresh head for ``classes``, initialised by the model
            model = _build(self.config, len(classes))
            clf = HFImageClassifier(model, self.preprocessing)
            clf.load_backbone(backbone)
            return clf.eval().requires_grad_(False)
        head = {k: head_source[k] for k in self.head_keys(head_source)}
        out_features = [t.shape[0] for k, t in head.items() if k.endswith("weight") and t.ndim == 2]
        if not out_features:
            raise IncompatibleModelsError("the checkpoint has no classification head tensors")
        num_labels = out_features[-1]
        if classes and num_labels != len(classes):
            raise DatasetError(
                f"the model's head has {num_labels} outputs but the dataset has {len(classes)} "
                "classes: evaluate it on the dataset it was fine-tuned for",
                details={"head_outputs": num_labels, "classes": list(classes)},
            )
        model = _build(self.config, num_labels)
        clf = HFImageClassifier(model, self.preprocessing)
        clf.load_backbone(backbone)
        own_head = {k: v for k, v in _tensors(model).items() if not k.startswith(self.prefix)}
        with torch.no_grad():
            for k, t in own_head.items():
                if k not in head or head[k].shape != t.shape:
                    raise IncompatibleModelsError(f"head tensor {k} is missing or mis-shaped")
                t.copy_(head[k].to(t.dtype))
        return clf.eval().requires_grad_(False)



def _processor_size(processor: Mapping[str, Any] | None) -> int:
    """The input side from an image-processor config (ResNet/ConvNeXt configs have none)."""
    p = dict(processor or {})
    size = p.get("crop_size") or p.get("size") or 224
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 224
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_IMAGE_SIDE:
        raise CorruptCheckpointError(
            f"preprocessor_config.json: size/crop_size must be an integer from 1 to "
            f"{MAX_IMAGE_SIDE} or "
            f"{{'height': ...}}, not {str(size)[:40]!r}; fix the processor config",
            details={"file": "preprocessor_config.json", "field": "size"})
    return size
