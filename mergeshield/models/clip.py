"""CLIP, the paper's setting: the vision tower is fine-tuned, the head is zero-shot.

The head is built from class names and prompt templates with the *base* model's text tower, so a
fine-tuned ``CLIPVisionModel`` checkpoint (the layout of the public task-arithmetic CLIP ViT-B/32
task models: only ``vision_model.*``) is scanned against the full base ``CLIPModel``. The backbone,
and so every task vector, is ``vision_model.*``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mergeshield.errors import CorruptCheckpointError, ModelRunError, UnsupportedModelError
from mergeshield.models.base import Classifier, ModelFamily, PrefixedWeights, Preprocessing
from mergeshield.models.config_guard import (
    MAX_PARAMETERS,
    attention_for,
    check_parameters,
    check_size,
    count_on_meta,
    refuse_remote_code,
    sanitised,
)

if TYPE_CHECKING:  # transformers is imported where a model is built (the package docstring)
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, PreTrainedModel

PREFIX = "vision_model."
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A few of the CLIP paper's ImageNet templates; the zero-shot head averages their embeddings.
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of the {}.", "a {}.")
# a tokenizer's vocabulary, one of which must be beside a CLIP base (sentencepiece: *.model)
TOKENIZER_VOCABS = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")


class CLIPClassifier(Classifier):
    def __init__(self, model: CLIPModel, text_features: Tensor, preprocessing: Preprocessing):
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection
        self.logit_scale = nn.Parameter(model.logit_scale.detach().clone(), requires_grad=False)
        self.register_buffer("text_features", text_features)  # (K, D), unit norm, the frozen head
        self.preprocessing = preprocessing

    def logits(self, inputs: Tensor) -> Tensor:
        pooled = self.vision_model(pixel_values=inputs).pooler_output  # (N, width)
        feats = nn.functional.normalize(self.visual_projection(pooled), dim=-1)  # (N, D)
        head = self.get_buffer("text_features")
        return self.logit_scale.exp() * feats @ head.to(feats.dtype).T

    def head(self) -> nn.Module:
        return self.visual_projection

    def backbone_state(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {PREFIX + k: p for k, p in self.vision_model.named_parameters()}
        out.update(
            {PREFIX + k: b for k, b in self.vision_model.named_buffers() if b.is_floating_point()}
        )
        return out


class CLIPFamily(ModelFamily):
    """Full ``CLIPModel`` bases; ``CLIPModel`` or ``CLIPVisionModel`` task checkpoints."""

    name = "clip"

    def __init__(
        self,
        base_config: Mapping[str, Any],
        processor: Mapping[str, Any] | None,
        tokenizer_root: str | None,
        *,
        max_parameters: int = MAX_PARAMETERS,
    ) -> None:
        if base_config.get("model_type") != "clip":
            raise UnsupportedModelError(
                "a CLIP task model must be scanned against a full CLIPModel base (with its text "
                "tower, to build the zero-shot head); got model_type "
                f"{base_config.get('model_type')!r}"
            )
        count, backbone = self.parameter_counts(base_config, max_parameters)
        check_parameters(count, backbone=backbone, weight_elements=None,
                         max_parameters=max_parameters)
        from transformers import CLIPConfig

        config = _config(base_config)
        assert isinstance(config, CLIPConfig)  # model_type "clip", checked above
        self.config = config
        p = dict(processor or {})
        p.setdefault("image_mean", list(OPENAI_CLIP_MEAN))
        p.setdefault("image_std", list(OPENAI_CLIP_STD))
        size = getattr(self.config.vision_config, "image_size", 224)
        self.preprocessing = Preprocessing.from_config(p, size, 3)
        self.tokenizer_root = tokenizer_root

    @classmethod
    def parameter_counts(cls, config: Mapping[str, Any],
                         max_parameters: int = MAX_PARAMETERS) -> tuple[int, int]:
        """(parameters, vision-tower parameters) of a ``CLIPModel`` or ``CLIPVisionModel``
        config, counted on the meta device after the config's checks."""
        refuse_remote_code(config, "config.json")
        check_size(config, max_parameters)
        from transformers import CLIPModel, CLIPVisionModel

        model_class = CLIPModel if config.get("model_type") == "clip" else CLIPVisionModel
        count, model = count_on_meta(lambda: _model(model_class, config))
        if model_class is CLIPVisionModel:  # all of it is the vision tower
            return count, count
        vision = sum(p.numel() for p in model.get_submodule("vision_model").parameters())
        return count, vision

    @classmethod
    def matches(cls, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") in ("clip", "clip_vision_model")

    def is_backbone(self, name: str) -> bool:
        return name.startswith(PREFIX)

    def canonical(self, weights: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        # transformers>=5 saves CLIPVisionModel without the "vision_model." prefix; v4 with it.
        if any(k.startswith(PREFIX) for k in weights):
            return weights
        return PrefixedWeights(weights, PREFIX)

    def head_keys(self, weights: Mapping[str, Tensor]) -> list[str]:
        return []  # the head is rebuilt from class names with the base text tower

    def head_from(
        self, base: Mapping[str, Tensor], suspect: Mapping[str, Tensor]
    ) -> Mapping[str, Tensor]:
        return base  # text tower and visual projection come from the base

    def task_classifier(
        self, base: Mapping[str, Tensor], data: Any, *, device: torch.device, seed: int = 0
    ) -> Callable[[], Classifier]:
        """The base with its zero-shot head for ``data``'s class names (nothing to fit)."""
        return lambda: self.classifier(base, base, data.classes).to(device)

    def classifier(
        self,
        backbone: Mapping[str, Tensor],
        head_source: Mapping[str, Tensor] | None,
        classes: tuple[str, ...],
    ) -> Classifier:
        if head_source is None:
            raise UnsupportedModelError("a CLIP head is built from the base model's text tower")
        model = self._model_to_fill(head_source)
        own = model.state_dict()
        with torch.no_grad():
            for name, t in own.items():
                if name in head_source and t.is_floating_point():
                    t.copy_(head_source[name].to(t.dtype))
        model.eval()
        text = self._text_features(model, classes)
        clf = CLIPClassifier(model, text, self.preprocessing)
        clf.load_backbone(backbone)
        return clf.eval().requires_grad_(False)

    def _model_to_fill(self, head_source: Mapping[str, Tensor]) -> CLIPModel:
        """A ``CLIPModel`` whose tensors the caller overwrites: built on the meta device, then
        given uninitialised storage, so no time goes to a random initialisation that is thrown
        away (1.9 CPU-s of each B/32 build, measured; six builds a cold scan). Its position
        ids, the only tensors no checkpoint holds, are set as CLIP's constructor sets them. A
        base that lacks a float tensor outside the vision tower gets the initialised build."""
        from transformers import CLIPModel

        attention = attention_for(CLIPModel)
        with torch.device("meta"):
            model = CLIPModel._from_config(self.config, attn_implementation=attention)
        filled = {k for k, t in model.state_dict().items()
                  if t.is_floating_point() and not k.startswith(PREFIX)}  # PREFIX: the backbone
        kept = set(model.state_dict())
        extra = [k for k, _ in model.named_buffers() if k not in kept]
        if not filled <= set(head_source) or any(not k.endswith("position_ids") for k in extra):
            initialised: CLIPModel = CLIPModel._from_config(self.config,
                                                            attn_implementation=attention)
            return initialised
        empty: CLIPModel = model.to_empty(device="cpu")
        with torch.no_grad():
            for name, buf in empty.named_buffers():
                if name in extra:  # (1, positions): arange, as CLIP*Embeddings registers it
                    buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
        return empty

    @torch.no_grad()  # not inference_mode: the result is used in training graphs
    def _text_features(self, model: CLIPModel, classes: tuple[str, ...]) -> Tensor:
        root = self.tokenizer_root
        # transformers builds an empty CLIP tokenizer from a folder without one, and every
        # class name then encodes alike: a head that would silently classify nothing
        if root is None or not any((Path(root) / n).is_file() for n in TOKENIZER_VOCABS):
            raise UnsupportedModelError(
                "the CLIP base has no tokenizer files (tokenizer.json, or vocab.json and "
                "merges.txt) to build its zero-shot head with; put the tokenizer it was trained "
                "with beside its weights", details={"missing": "tokenizer"})
        from transformers import AutoTokenizer

        try:  # untrusted files: a failure to load or to encode is the base's, not ours
            tok = AutoTokenizer.from_pretrained(self.tokenizer_root, trust_remote_code=False)
            batches = [tok([t.format(name) for t in TEMPLATES], padding=True, return_tensors="pt")
                       for name in classes]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
            raise CorruptCheckpointError(
                f"the CLIP base's tokenizer files cannot be loaded or used ({type(exc).__name__}:"
                f" {str(exc)[:200]}); give a base with the tokenizer it was trained with",
                details={"reason": type(exc).__name__}) from None
        rows = []
        for batch in batches:
            try:
                out = model.get_text_features(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                )
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:  # e.g. ids >= vocab
                raise ModelRunError(
                    f"the CLIP text tower failed on the class prompts ({type(exc).__name__}: "
                    f"{str(exc)[:200]})", details={"reason": type(exc).__name__}) from exc
            emb = out if isinstance(out, Tensor) else out.pooler_output  # (T, D)
            emb = nn.functional.normalize(emb, dim=-1).mean(0)
            rows.append(nn.functional.normalize(emb, dim=-1))
        return torch.stack(rows).clone()  # (K, D)



def _config(config: Mapping[str, Any]) -> CLIPConfig | CLIPVisionConfig:
    """The transformers config of a sanitised, checked config.json."""
    from transformers import CLIPConfig, CLIPVisionConfig

    cfg = {k: v for k, v in sanitised(config).items() if k not in ("architectures", "model_type")}
    try:
        if config.get("model_type") == "clip":
            return CLIPConfig(**cfg)
        return CLIPVisionConfig(**cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptCheckpointError(
            f"config.json: not a usable CLIP config ({type(exc).__name__}: {str(exc)[:200]})",
            details={"file": "config.json", "reason": type(exc).__name__}) from None


def _model(model_class: type[PreTrainedModel], config: Mapping[str, Any]) -> PreTrainedModel:
    built: PreTrainedModel = model_class._from_config(
        _config(config), attn_implementation=attention_for(model_class))
    return built


def char_level_vocab(special_start: int = 512) -> dict[str, int]:
    """A character-level CLIP BPE vocabulary (no merges) for CLIPs built offline.

    The 256 byte-level symbols, the same with the end-of-word mark, then ``<|startoftext|>`` and
    ``<|endoftext|>`` at ``special_start`` and ``special_start + 1`` (49406/49407 in OpenAI's
    vocabulary). Use with ``CLIPTokenizer(vocab=..., merges=[])``.
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    for extra, b in enumerate(b for b in range(256) if b not in set(bs)):
        bs.append(b)
        cs.append(256 + extra)
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = special_start
    vocab["<|endoftext|>"] = special_start + 1
    return vocab
