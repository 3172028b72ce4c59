"""LoRA adapters: a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) merged
into its base in safetensors space, so a scan sees the model the adapter makes.

For every adapted linear weight W of the base: W' = W + s·B·A, with s = lora_alpha / r (rsLoRA:
lora_alpha / √r; ``alpha_pattern`` sets a module's own alpha, matched as PEFT matches it;
``fan_in_fan_out`` transposes B·A). Tensors the adapter saves whole (``modules_to_save``, e.g. a
new classification head, and trained biases) replace the base's, in the base's float dtype as
PEFT loads them. The merged checkpoint is written once per (adapter, base) under the cache, like
a converted ``.bin``, and then scanned like any folder; the report's suspect still names the
adapter's own files. The merged source keeps the adapter (``MergedSource.adapter``), so the
cleaned result can be offered as an adapter of the same base too (``adapter_export``).

PEFT is never imported: the files are read as data. An adapter that is not a plain low-rank
update of linear weights (DoRA, LoRA on convolutions or embeddings, ``lora_bias``, another PEFT
method) is refused as ``unsupported_model``, never merged approximately.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeshield.checkpoints import (
    Checkpoint,
    ResolvedSource,
    TensorInfo,
    extra_files,
    open_checkpoint,
    read_json,
    save_checkpoint,
    sha256_file,
)
from mergeshield.disk import built_once, ensure_room, private_dir
from mergeshield.errors import (
    CorruptCheckpointError,
    IncompatibleModelsError,
    UnsupportedModelError,
)
from mergeshield.models import family_for

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MERGE_VERSION = "2"  # bump when the merge's arithmetic changes: cached merges are redone
PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")
_SAVED = re.compile(r"\.modules_to_save\.[^.]+")  # older PEFT kept the adapter's name in the key
# adapter_config.json fields that change what the adapter does and that this merge does not do
_REFUSED_FLAGS = ("use_dora", "lora_bias", "use_qalora", "use_bdlora")
_REFUSED_SET = ("target_parameters", "layer_replication", "trainable_token_indices",
                "megatron_config")


def is_adapter(src: ResolvedSource) -> bool:
    """Whether ``src`` is a PEFT adapter folder (its config names the adapter's method)."""
    return src.kind != "file" and (src.root / CONFIG).is_file()


@dataclass(frozen=True)
class MergedSource(ResolvedSource):
    """A LoRA adapter merged into its base: reads the merged weights, names the adapter's files."""

    adapter: ResolvedSource = field(kw_only=True, repr=False)  # the adapter folder itself


@dataclass(frozen=True)
class LoraSpec:
    """What ``adapter_config.json`` says about the merge."""

    alpha: float
    alpha_pattern: dict[str, float]
    rslora: bool
    fan_in_fan_out: bool

    @classmethod
    def read(cls, src: ResolvedSource) -> LoraSpec:
        cfg = read_json(src, CONFIG) or {}
        method = cfg.get("peft_type")
        if method != "LORA":
            raise UnsupportedModelError(
                f"{CONFIG}: peft_type {method!r} is not LoRA; only LoRA adapters are merged "
                "(merge it with PEFT and scan the merged model)", details={"peft_type": method})
        used = [k for k in _REFUSED_FLAGS if cfg.get(k)] + [k for k in _REFUSED_SET if cfg.get(k)]
        if used:
            raise UnsupportedModelError(
                f"{CONFIG}: {', '.join(used)} is not a plain low-rank update and is not merged "
                "here; merge it with PEFT (merge_and_unload) and scan the merged model",
                details={"options": used})
        try:
            return cls(alpha=float(cfg["lora_alpha"]),
                       alpha_pattern={str(k): float(v)
                                      for k, v in (cfg.get("alpha_pattern") or {}).items()},
                       rslora=bool(cfg.get("use_rslora")),
                       fan_in_fan_out=bool(cfg.get("fan_in_fan_out")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{CONFIG}: lora_alpha or alpha_pattern is unreadable "
                                         f"({type(exc).__name__})", details={"file": CONFIG}
                                         ) from None

    def scale(self, module: str, rank: int) -> float:
        """s for ``module`` (PEFT's ``get_pattern_key``: the first pattern the name ends with)."""
        alpha = next((a for p, a in self.alpha_pattern.items()
                      if re.match(rf"(.*\.)?({p})$", module)), self.alpha)
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def lora_merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
               fan_in_fan_out: bool) -> torch.Tensor:
    """W + s·B·A (A: (r, in), B: (out, r)) in float32, stored in W's dtype, as PEFT merges."""
    delta = b.to(torch.float32) @ a.to(torch.float32)
    if fan_in_fan_out:
        delta = delta.T
    return torch.add(weight.to(torch.float32), delta, alpha=scale).to(weight.dtype)


class Merged(Mapping[str, torch.Tensor]):
    """``base`` with ``adapter`` merged in, one tensor computed per access (float32 arithmetic,
    stored in the base tensor's dtype)."""

    def __init__(self, base: Checkpoint, adapter: Checkpoint, spec: LoraSpec,
                 names: Mapping[str, str] | None = None) -> None:
        """``names``: the family's in-memory → checkpoint tensor names (``checkpoint_names``),
        since PEFT names modules as they are in memory."""
        self.base, self.adapter, self.spec = base, adapter, spec
        rename = names or {}
        self.pairs: dict[str, dict[str, str]] = {}  # base weight -> {"A": key, "B": key}
        self.replaced: dict[str, str] = {}  # base key -> the adapter's whole tensor
        self.module_of: dict[str, str] = {}  # base weight -> the module's name in memory
        for key in adapter:
            if not key.startswith(PREFIX):
                raise CorruptCheckpointError(f"{WEIGHTS}: tensor {key!r} is not under "
                                             f"{PREFIX!r}, so it names no module of the base",
                                             details={"tensor": key})
            name = key[len(PREFIX):]
            lora = _LORA.match(name)
            if lora:
                weight = f"{lora['module']}.weight"
                stored = rename.get(weight, weight)
                self.pairs.setdefault(stored, {})[lora["side"]] = key
                self.module_of[stored] = lora["module"]  # alpha_pattern names it so
            elif ".lora_" in name:  # embeddings, DoRA magnitudes, lora_B biases
                raise UnsupportedModelError(
                    f"{WEIGHTS}: {key!r} is not a LoRA A/B weight of a linear layer; this "
                    "variant is not merged here", details={"tensor": key})
            else:
                name = _SAVED.sub("", name)
                self.replaced[rename.get(name, name)] = key
        for weight, sides in self.pairs.items():
            self._check(weight, sides)
        unknown = [k for k in self.replaced if k not in base]
        if unknown:
            raise IncompatibleModelsError(
                f"the adapter saves {len(unknown)} tensor(s) the base does not have, e.g. "
                f"{unknown[:3]}: is this adapter made for this base?",
                details={"missing": unknown, "unexpected": [], "shape": [], "dtype": []})

    def _check(self, weight: str, sides: dict[str, str]) -> None:
        if set(sides) != {"A", "B"}:
            raise CorruptCheckpointError(f"{WEIGHTS}: {weight} has lora_{''.join(sides)} only",
                                         details={"tensor": weight})
        if weight not in self.base:
            raise IncompatibleModelsError(
                f"the adapter changes {weight}, which the base does not have: is this adapter "
                "made for this base?", details={"missing": [weight], "unexpected": [],
                                                "shape": [], "dtype": []})
        a, b = (self.adapter.info(sides[s]).shape for s in "AB")
        w = self.base.info(weight).shape
        out_in = (w[1], w[0]) if self.spec.fan_in_fan_out else tuple(w)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or (b[0], a[1]) != out_in:
            raise IncompatibleModelsError(
                f"{weight}: lora_B·lora_A is {b[0]}×{a[-1]} (rank {a[0]}), the base weight "
                f"{'×'.join(map(str, w))}: only linear layers of this base are merged",
                details={"missing": [], "unexpected": [], "dtype": [],
                         "shape": [{"name": weight, "base": list(w),
                                    "other": [b[0], a[-1]]}]})

    def info(self, name: str) -> TensorInfo:
        if name in self.replaced:
            saved = self.adapter.info(self.replaced[name])
            dtype = self._dtype(name, saved.dtype)
            return TensorInfo(dtype, saved.shape, math.prod(saved.shape) * dtype.itemsize)
        return self.base.info(name)

    def _dtype(self, name: str, saved: torch.dtype) -> torch.dtype:
        """A saved float tensor takes the base's float dtype, as PEFT loads it into the base's
        module (a float32 head of a bfloat16 base is a bfloat16 head)."""
        own = self.base.info(name).dtype
        return own if own.is_floating_point and saved.is_floating_point else saved

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            saved = self.adapter[self.replaced[name]]
            return saved.to(self._dtype(name, saved.dtype))
        w = self.base[name]
        sides = self.pairs.get(name)
        if sides is None:
            return w
        a, b = (self.adapter[sides[s]] for s in "AB")
        return lora_merge(w, a, b, self.spec.scale(self.module_of[name], a.shape[0]),
                          self.spec.fan_in_fan_out)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def as_model(src: ResolvedSource, base: ResolvedSource, *, cache_dir: str | Path | None,
             min_free_bytes: int | None = None) -> ResolvedSource:
    """``src`` itself, or, when it is a LoRA adapter, the model it makes with ``base``
    (``merged_source``): what scan, bv compute, merge and merge plans read."""
    if not is_adapter(src):
        return src
    return merged_source(src, base, cache_dir=cache_dir, min_free_bytes=min_free_bytes)


def merged_source(adapter: ResolvedSource, base: ResolvedSource, *,
                  cache_dir: str | Path | None, min_free_bytes: int | None = None
                  ) -> MergedSource:
    """``adapter`` merged into ``base``, written once (keyed by both sides' files), as a source
    that reads the merged weights and reports the adapter's own files and revision."""
    if base.config is None:
        raise UnsupportedModelError("the base has no config.json, so the merged model cannot "
                                    "be described; give the base's model folder")
    spec = LoraSpec.read(adapter)
    digest = hashlib.sha256(json.dumps(
        [MERGE_VERSION, adapter.files_digest(), sha256_file(adapter.root / CONFIG),
         base.files_digest()]).encode()).hexdigest()
    folder = _merges_dir(cache_dir) / digest
    if not (folder / "config.json").is_file():
        names = family_for(base.config, base.config).checkpoint_names()
        with open_checkpoint(base) as b, open_checkpoint(adapter) as a:
            merged = Merged(b, a, spec, names)
            config = _config(base.config, merged, digest)
            specs = {k: merged.info(k) for k in merged}
            if min_free_bytes is not None:
                ensure_room(folder.parent, sum(i.nbytes for i in specs.values()), min_free_bytes,
                            "merging the adapter into its base")
            with built_once(folder, ".merging-") as work:
                save_checkpoint(work, merged, specs=specs, config=config,
                                extra_files=extra_files(base), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    return MergedSource(adapter.source, adapter.kind, adapter.revision_requested,
                        adapter.revision, folder, adapter.weight_files, config,
                        tuple(sorted(folder.glob("*.safetensors"))), adapter=adapter)


def _config(base: Mapping[str, Any], merged: Merged, digest: str) -> dict[str, Any]:
    """The base's config, with the head size the adapter's saved head has, and where it came
    from (so the merged config, which the report digests, changes with the adapter's config)."""
    config = dict(base)
    labels = base.get("id2label") or {}
    for key in merged.replaced:
        old, new = merged.base.info(key).shape, merged.info(key).shape
        if old != new and old and labels and old[0] == len(labels):
            config["num_labels"] = new[0]
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(new[0])}
            config["label2id"] = {f"LABEL_{i}": i for i in range(new[0])}
            break
    config["mergeshield_merged_adapter"] = {"method": "LORA", "merge": digest}
    return config


def _merges_dir(cache_dir: str | Path | None) -> Path:
    """The cache's ``mergeshield-adapters`` folder, else a private per-user temp folder."""
    return private_dir(cache_dir, "mergeshield-adapters")
