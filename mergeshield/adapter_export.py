"""The cleaned result of a scanned LoRA adapter, offered as a LoRA adapter of the same base too,
but only where that is exact: merged into the base again (``adapters.Merged``, PEFT's arithmetic)
it must give every tensor of the cleaned checkpoint to float tolerance, or none is written.

The cleaning's correction may touch more than the adapter's low-rank updates (IBVS's masked BV_inj
is full rank; unlearning moves every backbone tensor), so the adapter is rebuilt from
Δ = θ_cleaned − θ_base, tensor by tensor:
- a changed weight of a linear module the scanned adapter adapted: LoRA at the smallest rank
  whose update, merged as PEFT merges it, gives the cleaned weight (SVD of Δ, B = U·√S,
  A = √S·Vh, scale 1 through per-module ``rank_pattern`` / ``alpha_pattern``), unless saving the
  module whole costs fewer bytes, as a full-rank Δ does;
- any other changed tensor: its module saved whole (``modules_to_save``, outermost modules only;
  a LoRA module inside a saved one, or whose bias changed, is saved whole as well).
PEFT needs one LoRA module: without one, an adapted module that Δ leaves alone carries a zero
rank-1 update. No adapter is written (``Offer.message`` says why) when the result would not be
smaller than the cleaned checkpoint, when PEFT's name matching would reach other modules too, or
when re-merging the written files does not reproduce the checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mergeshield.adapters import (
    CONFIG,
    PREFIX,
    WEIGHTS,
    LoraSpec,
    Merged,
    MergedSource,
    lora_merge,
)
from mergeshield.checkpoint_writer import write_safetensors
from mergeshield.checkpoints import Checkpoint, ResolvedSource, TensorInfo, open_checkpoint
from mergeshield.models import family_for
from mergeshield.safetensors_io import atomic_write_text

FOLDER = "adapter"  # inside the scan's output folder, beside the cleaned checkpoint
# "exact": |re-merged − cleaned| ≤ eps·|cleaned| + max(ATOL, eps)·max|cleaned| entry by entry
# (eps of the stored dtype): float32 agreement at the tensor's scale, as float32 SVD factors
# give; a 16-bit weight may also round one step of its largest value the other way (the SVD
# sees Δ after the cleaning rounded it, which no low-rank update matches bit for bit)
ATOL = 1e-5
FACTOR_DTYPE = torch.float32  # LoRA A and B, whatever the base's dtype (PEFT computes in float32)
Status = Literal["written", "not_smaller", "not_exact"]


@dataclass(frozen=True)
class Offer:
    """What became of the adapter form: written (``folder``, ``files``) or not, and why."""

    status: Status
    message: str
    folder: Path | None = None
    files: tuple[Path, ...] = ()
    max_abs_error: float | None = None  # largest |re-merged − cleaned| over every tensor


@dataclass(frozen=True)
class _Lora:
    weight: str  # the base weight's checkpoint name
    rank: int  # 0: the zero rank-1 update PEFT needs when nothing else is LoRA


@dataclass(frozen=True)
class _Plan:
    lora: dict[str, _Lora]  # module (name in memory) -> its update, in base order
    saved: dict[str, list[str]]  # module (name in memory) -> its tensors (checkpoint names)
    live: dict[str, str]  # checkpoint name -> name in memory
    nbytes: int
    total_bytes: int  # the cleaned checkpoint's tensors


def offer(out_dir: Path, merged: MergedSource, base: ResolvedSource, cleaned_files: Sequence[Path],
          *, metadata: Mapping[str, str], base_label: str) -> Offer:
    """Write ``out_dir/adapter`` (PEFT layout) when base + adapter == the cleaned checkpoint in
    ``cleaned_files``; otherwise write nothing and say why. An older adapter there is removed."""
    folder = out_dir / FOLDER
    shutil.rmtree(folder, ignore_errors=True)  # a retry's answer replaces the earlier one
    files = tuple(cleaned_files)
    cleaned_src = ResolvedSource(str(out_dir), "directory", None, None, out_dir, files, None, files)
    names = family_for(base.config, base.config).checkpoint_names()  # as merged_source did
    spec = LoraSpec.read(merged.adapter)
    with open_checkpoint(base) as b, open_checkpoint(merged.adapter) as a, \
            open_checkpoint(cleaned_src) as c:
        plan = _plan(b, c, Merged(b, a, spec, names), names)
        if isinstance(plan, Offer):
            return plan
        work = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir))
        try:
            _write(work, plan, b, c, spec.fan_in_fan_out, metadata,
                   {"base_model_name_or_path": base_label, "revision": base.revision})
            checked = _remerge(work, b, c, names)
            if isinstance(checked, Offer):
                return checked
            work.rename(folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ranks = [u.rank for u in plan.lora.values() if u.rank]
    lora = (f"{len(ranks)} module(s) as LoRA (rank {min(ranks)}–{max(ranks)})" if ranks else
            "a zero rank-1 LoRA update on one module (PEFT needs one)")
    return Offer("written", (
        f"an exact LoRA adapter of the base: {lora}, {len(plan.saved)} module(s) saved whole "
        f"(modules_to_save); merged into the base it gives every tensor of the cleaned checkpoint "
        f"(largest difference {checked:.2g}); {_size(plan.nbytes)}, "
        f"{100 * plan.nbytes / plan.total_bytes:.0f}% of the checkpoint"),
        folder, (folder / CONFIG, folder / WEIGHTS), checked)


def _plan(base: Checkpoint, cleaned: Checkpoint, merged: Merged, names: Mapping[str, str]
          ) -> _Plan | Offer:
    """Which module becomes LoRA (and at what rank) and which is saved whole; or why none can."""
    if set(cleaned) != set(base):
        odd = sorted(set(cleaned) ^ set(base))
        return Offer("not_exact", f"no adapter: the cleaned checkpoint names its tensors "
                                  f"unlike the base (e.g. {odd[:3]}), so no adapter of the base "
                                  "names them")
    in_memory = {ck: mem for mem, ck in names.items()}
    live = {k: in_memory.get(k, k) for k in base}  # in base order
    lora: dict[str, _Lora] = {}
    save: set[str] = set()
    changed = 0
    for key in base:
        b, c = base[key], cleaned[key]
        if b.dtype == c.dtype and b.shape == c.shape and torch.equal(b, c):
            continue
        changed += 1
        module = merged.module_of.get(key) if b.shape == c.shape else None
        if module is None:  # not an adapted linear weight: its module saved whole
            owner = live[key].rpartition(".")[0]
            if not owner:
                return Offer("not_exact", f"no adapter: the cleaning changed {key}, a parameter "
                                          "of the model itself, which modules_to_save cannot name")
            save.add(owner)
            continue
        whole = sum(cleaned.info(k).nbytes for k in _tensors(module, live))
        rank = _rank(b, c, merged.spec.fan_in_fan_out, whole)
        if rank is None:  # no LoRA smaller than the module gives it
            save.add(module)
        else:
            lora[module] = _Lora(key, rank)
    saved = {m: _tensors(m, live) for m in sorted(save)
             if not any(m.startswith(s + ".") for s in save)}
    lora = {m: u for m, u in lora.items()
            if not any(m == s or m.startswith(s + ".") for s in saved)}

    def size() -> int:
        return (sum(_lora_bytes(base.info(u.weight).shape, max(u.rank, 1)) for u in lora.values())
                + sum(cleaned.info(k).nbytes for ks in saved.values() for k in ks))

    total = sum(cleaned.info(k).nbytes for k in cleaned)
    if size() >= total:
        return Offer("not_smaller", (
            f"no adapter: the cleaning changed {changed} of {len(base)} tensors, and an exact "
            f"adapter of them would be {_size(size())}, not smaller than the {_size(total)} "
            "cleaned checkpoint: use the checkpoint"))
    if not lora:  # PEFT needs a LoRA module: a zero update of one that Δ leaves alone
        spare = next(((k, m) for k, m in merged.module_of.items()
                      if not any(m == s or m.startswith(s + ".") for s in saved)), None)
        if spare is None:
            return Offer("not_exact", "no adapter: every adapted module is saved whole, and "
                                      "PEFT needs at least one LoRA module")
        lora[spare[1]] = _Lora(spare[0], 0)
    clash = _ambiguous(lora, saved, live.values())
    if clash:
        return Offer("not_exact", f"no adapter: {clash}")
    return _Plan(lora, saved, live, size(), total)


def _tensors(module: str, live: Mapping[str, str]) -> list[str]:
    """The checkpoint names of ``module``'s tensors (its own and its submodules')."""
    return [k for k, mem in live.items() if mem.startswith(module + ".")]


def _ambiguous(lora: Mapping[str, _Lora], saved: Mapping[str, list[str]],
               tensors: Any) -> str | None:
    """Where PEFT would also wrap another module: a target matches names ending ".<target>",
    a module to save any name ending in it."""
    modules = {n.rsplit(".", i)[0] for n in tensors for i in range(1, n.count(".") + 1)}
    for target in lora:
        other = next((m for m in modules if m.endswith("." + target)), None)
        if other:
            return f"PEFT would apply the LoRA of {target} to {other} as well"
    for name in saved:
        other = next((m for m in modules if m != name and m.endswith(name)), None)
        if other:
            return f"PEFT would save {other} as well as {name}"
    return None


def _delta(base: Tensor, cleaned: Tensor, fan_in_fan_out: bool) -> Tensor:
    """Δ (out, in) in float64, as B·A must give it."""
    delta = cleaned.to(torch.float64) - base.to(torch.float64)
    return delta.T if fan_in_fan_out else delta


def excess(got: Tensor, want: Tensor) -> float:
    """The largest |got − want| in units of the allowed difference (≤ 1: exact; see ATOL)."""
    if not want.numel():
        return 0.0
    diff = (got.to(torch.float64) - want.to(torch.float64)).abs()
    top = float(want.abs().max())
    eps = torch.finfo(want.dtype).eps
    allowed = eps * want.to(torch.float64).abs() + max(ATOL, eps) * top
    if not top:
        return 0.0 if not float(diff.max()) else float("inf")
    return float((diff / allowed).max())


def _rank(base: Tensor, cleaned: Tensor, fan_in_fan_out: bool, whole: int) -> int | None:
    """The smallest rank whose LoRA, merged as PEFT merges, gives ``cleaned`` exactly; None when
    none costs fewer bytes than ``whole`` (the module saved whole)."""
    out_in = _shape(tuple(base.shape), fan_in_fan_out)
    top = min(min(out_in), (whole - 1) // _lora_bytes(out_in, 1))
    if top < 1:
        return None
    svd = torch.linalg.svd(_delta(base, cleaned, fan_in_fan_out), full_matrices=False)

    def exact(rank: int) -> bool:
        a, b = _factors(svd, rank)
        return excess(lora_merge(base, a, b, 1.0, fan_in_fan_out), cleaned) <= 1

    if not exact(top):
        return None
    lo = 1
    while lo < top:  # the truncation error shrinks with the rank: bisect
        mid = (lo + top) // 2
        lo, top = (lo, mid) if exact(mid) else (mid + 1, top)
    return top


def _shape(weight: tuple[int, ...], fan_in_fan_out: bool) -> tuple[int, int]:
    """(out, in) of a linear weight stored as ``weight``."""
    out, inp = weight
    return (inp, out) if fan_in_fan_out else (out, inp)


def _lora_bytes(shape: tuple[int, ...], rank: int) -> int:
    """Bytes of A and B at ``rank`` for a (out, in) or (in, out) weight."""
    return rank * (shape[0] + shape[1]) * FACTOR_DTYPE.itemsize


def _factors(svd: tuple[Tensor, Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) with B·A = Δ but for its singular values past ``rank``."""
    u, s, vh = svd
    root = s[:rank].sqrt()
    return ((root[:, None] * vh[:rank]).to(FACTOR_DTYPE).contiguous(),
            (u[:, :rank] * root).to(FACTOR_DTYPE).contiguous())


def _write(work: Path, plan: _Plan, base: Checkpoint, cleaned: Checkpoint, fan_in_fan_out: bool,
           metadata: Mapping[str, str], provenance: dict[str, Any]) -> None:
    """``adapter_model.safetensors`` (one tensor in memory at a time), ``adapter_config.json``."""
    shapes = {m: _shape(base.info(u.weight).shape, fan_in_fan_out) for m, u in plan.lora.items()}
    specs: list[tuple[str, TensorInfo]] = []
    for module, u in plan.lora.items():
        (out, inp), r = shapes[module], max(u.rank, 1)
        for side, shape in (("A", (r, inp)), ("B", (out, r))):
            nbytes = shape[0] * shape[1] * FACTOR_DTYPE.itemsize
            specs.append((f"{PREFIX}{module}.lora_{side}.weight",
                          TensorInfo(FACTOR_DTYPE, shape, nbytes)))
    specs += [(PREFIX + plan.live[k], cleaned.info(k)) for ks in plan.saved.values() for k in ks]

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for module, u in plan.lora.items():
            out, inp = shapes[module]
            delta = _delta(base[u.weight], cleaned[u.weight], fan_in_fan_out)
            a, b = (_factors(torch.linalg.svd(delta, full_matrices=False), u.rank)
                    if u.rank else (torch.zeros(1, inp, dtype=FACTOR_DTYPE),
                                    torch.zeros(out, 1, dtype=FACTOR_DTYPE)))
            yield f"{PREFIX}{module}.lora_A.weight", a
            yield f"{PREFIX}{module}.lora_B.weight", b
        for ks in plan.saved.values():
            yield from ((PREFIX + plan.live[k], cleaned[k]) for k in ks)

    write_safetensors(work / WEIGHTS, specs, tensors(), metadata)
    ranks = {m: max(u.rank, 1) for m, u in plan.lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}  # PEFT matches by regex
    config = {
        "peft_type": "LORA", "task_type": None, **provenance,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": pattern,  # scale 1
        "use_rslora": False, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
        "target_modules": list(ranks), "modules_to_save": list(plan.saved) or None,
        "lora_dropout": 0.0, "inference_mode": True, "init_lora_weights": True,
    }
    atomic_write_text(work / CONFIG, json.dumps(config, indent=2) + "\n")


def _remerge(work: Path, base: Checkpoint, cleaned: Checkpoint, names: Mapping[str, str]
             ) -> float | Offer:
    """The written adapter merged into the base again: the largest difference from the cleaned
    checkpoint, or why it is not exact."""
    files = (work / WEIGHTS,)
    src = ResolvedSource(str(work), "directory", None, None, work, files, None, files)
    worst = 0.0
    with open_checkpoint(src) as adapter:
        remerged = Merged(base, adapter, LoraSpec.read(src), names)
        for key in cleaned:
            got, want = remerged[key], cleaned[key]
            if got.dtype != want.dtype or got.shape != want.shape:
                return Offer("not_exact", f"no adapter: merged into the base it gives {key} as "
                                          f"{got.dtype} {tuple(got.shape)}, the cleaned "
                                          f"checkpoint has {want.dtype} {tuple(want.shape)}")
            if not want.is_floating_point() or not want.numel():
                if not torch.equal(got, want):
                    return Offer("not_exact", f"no adapter: merged into the base it changes {key}")
                continue
            err = float((got.double() - want.double()).abs().max())
            if excess(got, want) > 1:
                return Offer("not_exact", f"no adapter: merged into the base it differs from the "
                                          f"cleaned checkpoint by up to {err:.3g} in {key}, more "
                                          "than float rounding")
            worst = max(worst, err)
    return worst


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"
