"""Backdoor triggers, stamped in pixel space (``[0, 1]``, before normalisation), and poisoning.

BadNets patches (Gu et al., 2017), blended injection (Chen et al., 2017), user-supplied
pattern + mask triggers (e.g. a BadMerging universal adversarial patch or an inverted trigger) and
smooth warps (WaNet, Nguyen & Tran, ICLR 2021; the warp search's finding).
Patterns are generated deterministically from the trigger and the image shape.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from mergeshield.data import ImageDataset
from mergeshield.errors import ConfigError
from mergeshield.options import Pixel, Seed

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left", "center"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PatchTrigger(_Frozen):
    """BadNets: a ``size`` x ``size`` patch pasted over the image."""

    kind: Literal["patch"] = "patch"
    pattern: Literal["solid", "checkerboard", "random"] = "checkerboard"  # BadNets' usual choice
    size: int = Field(default=3, ge=1, le=4096)  # side in pixels at the dataset's resolution
    location: Corner | tuple[Pixel, Pixel] = "bottom_right"  # (row, col) of the top-left pixel
    margin: Pixel = 1  # pixels from the border for corner locations
    value: float = Field(default=1.0, ge=0, le=1)  # solid colour, checkerboard high; low is 1-value
    seed: Seed = 0  # for pattern="random"


class BlendedTrigger(_Frozen):
    """Blended injection: ``x' = (1 - alpha) x + alpha * pattern`` over the whole image."""

    kind: Literal["blended"] = "blended"
    pattern: Literal["noise", "stripes"] = "noise"
    alpha: float = Field(default=0.15, ge=0, le=1)  # the paper's attacks use 0.1-0.2
    seed: Seed = 0  # for pattern="noise"


class ImageTrigger(_Frozen):
    """A given pattern ``(C, H, W)`` and mask ``(H, W)``: ``x' = (1 - m) x + m * pattern``."""

    kind: Literal["image"] = "image"
    pattern: list[list[list[float]]]  # (C, H, W) in [0, 1]; (C, h, w) patch if location is set
    mask: list[list[float]] | None = None  # (h, w) in [0, 1] like the pattern; None = all ones
    location: tuple[Pixel, Pixel] | None = None  # top-left (row, col) of a small patch

    @model_validator(mode="after")
    def _check(self) -> ImageTrigger:
        p = torch.tensor(self.pattern) if self.pattern and self.pattern[0] else torch.zeros(0)
        if p.ndim != 3 or p.numel() == 0 or not bool(((p >= 0) & (p <= 1)).all()):
            raise ValueError("pattern must be a non-empty (C, H, W) array of values in [0, 1]")
        if self.mask is not None:
            m = torch.tensor(self.mask)
            if m.shape != p.shape[1:] or not bool(((m >= 0) & (m <= 1)).all()):
                raise ValueError(f"mask must be {tuple(p.shape[1:])} with values in [0, 1]")
        return self


class WarpTrigger(_Frozen):
    """A smooth warp: a ``g`` × ``g`` lattice of control offsets in pixels, ``(2, g, g)`` as
    (x, y), upsampled bicubically to the image and resampled through (``warp_field``)."""

    kind: Literal["warp"] = "warp"
    offsets: list[list[list[float]]]  # (2, g, g) pixels, x then y; 2 <= g <= 16

    @model_validator(mode="after")
    def _check(self) -> WarpTrigger:
        o = torch.tensor(self.offsets) if self.offsets and self.offsets[0] else torch.zeros(0)
        if (o.ndim != 3 or o.shape[0] != 2 or o.shape[1] != o.shape[2]
                or not 2 <= o.shape[1] <= 16):
            raise ValueError("offsets must be a (2, g, g) array with 2 <= g <= 16")
        if not bool(torch.isfinite(o).all()) or float(o.abs().max()) > 64:
            raise ValueError("offsets must be finite pixels of at most 64")
        return self


Trigger = Annotated[PatchTrigger | BlendedTrigger | ImageTrigger | WarpTrigger,
                    Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Trigger] = TypeAdapter(Trigger)
_POSITIONAL = {"patch": ("pattern", "size", "location"), "blended": ("pattern", "alpha")}


def _short_form(spec: str) -> dict[str, Any]:
    """``"patch:checkerboard:3:bottom_right"``, ``"patch:solid:4:10,12:value=0.5"``, ..."""
    kind, *parts = spec.strip().split(":")
    if kind not in _POSITIONAL:
        raise ConfigError(f"unknown trigger {spec!r}: use patch:PATTERN:SIZE:LOCATION, "
                          "blended:PATTERN:ALPHA or a JSON object (image triggers)")
    out: dict[str, Any] = {"kind": kind}
    for i, part in enumerate(parts):
        key, eq, val = part.partition("=")
        if not eq:
            if i >= len(_POSITIONAL[kind]):
                raise ConfigError(f"too many fields in trigger {spec!r}")
            key, val = _POSITIONAL[kind][i], part
        out[key] = [v.strip() for v in val.split(",")] if "," in val else val
    return out


def parse_trigger(spec: dict[str, Any] | str | Trigger) -> Trigger:
    """A trigger from a dict, a JSON string or a short form like ``"blended:noise:0.15"``."""
    if isinstance(spec, PatchTrigger | BlendedTrigger | ImageTrigger | WarpTrigger):
        return spec
    if isinstance(spec, str):
        if spec.lstrip().startswith("{"):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ConfigError(f"trigger is not valid JSON: {e}") from e
        else:
            spec = _short_form(spec)
    try:
        return _ADAPTER.validate_python(spec)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_context=False, include_input=False)
        raise ConfigError(f"invalid trigger {spec!r}: {e.error_count()} error(s): " + "; ".join(
            f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errors),
            details=errors) from e


def corner(loc: Corner | tuple[int, int], margin: int, h: int, w: int,
           img_h: int, img_w: int) -> tuple[int, int]:
    """Top-left (row, col) of an ``h`` x ``w`` patch at ``loc`` in ``img_h`` x ``img_w`` images."""
    if isinstance(loc, tuple):
        row, col = loc
    elif loc == "center":
        row, col = (img_h - h) // 2, (img_w - w) // 2
    else:
        row = margin if loc.startswith("top") else img_h - h - margin
        col = margin if loc.endswith("left") else img_w - w - margin
    if row < 0 or col < 0 or row + h > img_h or col + w > img_w:
        raise ConfigError(f"a {h}x{w} trigger at (row {row}, col {col}) does not fit in "
                          f"{img_h}x{img_w} images: use a smaller size, margin or location")
    return row, col


def _patch_pattern(t: PatchTrigger, channels: int) -> torch.Tensor:
    """(C, size, size) pattern of a BadNets patch."""
    if t.pattern == "random":
        g = torch.Generator().manual_seed(t.seed)
        return torch.rand(channels, t.size, t.size, generator=g)
    if t.pattern == "solid":
        return torch.full((channels, t.size, t.size), t.value)
    ij = torch.arange(t.size)
    on = ((ij[:, None] + ij[None, :]) % 2 == 0).float()
    return (on * t.value + (1 - on) * (1 - t.value)).expand(channels, -1, -1).clone()


def _blend_pattern(t: BlendedTrigger, c: int, h: int, w: int) -> torch.Tensor:
    """(C, H, W) full-image pattern."""
    if t.pattern == "noise":
        return torch.rand(c, h, w, generator=torch.Generator().manual_seed(t.seed))
    period = max(1, w // 8)  # about 4 stripe pairs across the image, any resolution
    stripes = ((torch.arange(w) // period) % 2 == 0).float()
    return stripes.expand(c, h, w).clone()


def warp_field(offsets: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sampling grids ``(K, H, W, 2)`` in [-1, 1] from control offsets ``(K, 2, g, g)`` in pixels
    (differentiable: the warp search optimises the offsets through it)."""
    step = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], device=offsets.device)
    dense = torch.nn.functional.interpolate(offsets * step[None, :, None, None], size=(h, w),
                                            mode="bicubic", align_corners=True)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=offsets.device),
                            torch.linspace(-1, 1, w, device=offsets.device), indexing="ij")
    return (torch.stack([xs, ys], dim=-1)[None] + dense.permute(0, 2, 3, 1)).clamp(-1, 1)


def warp(images: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
    """``images`` (N, C, H, W) resampled through ``fields`` (N or 1, H, W, 2), kept in [0, 1]."""
    grid = fields.to(images).expand(len(images), -1, -1, -1)
    return torch.nn.functional.grid_sample(images, grid, align_corners=True).clamp(0, 1)


def stamp(images: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """Stamp ``trigger`` on ``(N, C, H, W)`` images in [0, 1]; returns a new tensor."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ConfigError(f"stamp needs float (N, C, H, W) images, got {tuple(images.shape)}")
    n, c, img_h, img_w = images.shape
    if isinstance(trigger, WarpTrigger):
        return warp(images, warp_field(torch.tensor(trigger.offsets)[None], img_h, img_w))
    out = images.clone()
    if isinstance(trigger, BlendedTrigger):
        pattern = _blend_pattern(trigger, c, img_h, img_w).to(images)
        return (1 - trigger.alpha) * out + trigger.alpha * pattern
    if isinstance(trigger, PatchTrigger):
        pattern = _patch_pattern(trigger, c)
        mask = torch.ones(trigger.size, trigger.size)
        row, col = corner(trigger.location, trigger.margin, trigger.size, trigger.size,
                           img_h, img_w)
    else:
        pattern = torch.tensor(trigger.pattern, dtype=torch.float32)
        h, w = pattern.shape[1:]
        mask = torch.ones(h, w) if trigger.mask is None else torch.tensor(trigger.mask)
        if trigger.location is None and (h, w) != (img_h, img_w):
            raise ConfigError(f"image trigger is {h}x{w} but images are {img_h}x{img_w}: "
                              "give a full-size pattern or a location for a patch")
        row, col = corner(trigger.location or (0, 0), 0, h, w, img_h, img_w)
        if pattern.shape[0] not in (1, c):
            raise ConfigError(f"image trigger has {pattern.shape[0]} channels, images have {c}")
    h, w = mask.shape
    region = out[:, :, row:row + h, col:col + w]
    m, p = mask.to(images), pattern.to(images)
    out[:, :, row:row + h, col:col + w] = (1 - m) * region + m * p
    return out


def trigger_id(trigger: Trigger) -> str:
    """A short stable id, e.g. ``patch-checkerboard-3-bottom_right`` or ``blended-noise-0.15``."""
    if isinstance(trigger, ImageTrigger | WarpTrigger):
        digest = hashlib.sha256(trigger.model_dump_json().encode()).hexdigest()
        return f"{trigger.kind}-{digest[:8]}"
    if isinstance(trigger, BlendedTrigger):
        seed = f"-s{trigger.seed}" if trigger.pattern == "noise" and trigger.seed else ""
        return f"blended-{trigger.pattern}-{trigger.alpha:g}{seed}"
    loc = trigger.location
    parts = ["patch", trigger.pattern, str(trigger.size),
             loc if isinstance(loc, str) else f"r{loc[0]}c{loc[1]}"]
    if isinstance(loc, str) and loc != "center" and trigger.margin != 1:
        parts.append(f"m{trigger.margin}")
    if trigger.pattern != "random" and trigger.value != 1.0:
        parts.append(f"v{trigger.value:g}")
    if trigger.pattern == "random" and trigger.seed:
        parts.append(f"s{trigger.seed}")
    return "-".join(parts)


def preview_png(image: torch.Tensor, trigger: Trigger, scale: int = 4) -> bytes:
    """PNG bytes of one ``(C, H, W)`` image with the trigger, upscaled ``scale`` x (nearest)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3) or scale < 1:
        raise ConfigError(f"preview needs a (1|3, H, W) image and scale >= 1, "
                          f"got {tuple(image.shape)} and {scale}")
    x = stamp(image[None].float(), trigger)[0]
    x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    arr = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def from_tensor(pattern: torch.Tensor, mask: torch.Tensor | None,
                location: tuple[int, int] | None = None) -> ImageTrigger:
    """An ImageTrigger from a ``(C, H, W)`` (or ``(H, W)``) pattern and an ``(H, W)`` mask."""
    p = pattern.detach().float().cpu()
    p = p[None] if p.ndim == 2 else p
    m = None if mask is None else mask.detach().float().cpu().reshape(p.shape[1:]).tolist()
    try:
        return ImageTrigger(pattern=p.tolist(), mask=m, location=location)
    except ValidationError as e:
        raise ConfigError(f"invalid image trigger: {e}") from e


def poison(dataset: ImageDataset, trigger: Trigger, target: int, rate: float,
           seed: int) -> tuple[ImageDataset, torch.Tensor]:
    """BadNets poisoning: stamp ``round(rate * N)`` seeded non-target rows, relabel to ``target``.

    Returns the poisoned copy and the bool mask ``(N,)`` of poisoned rows.
    """
    if not 0 <= target < len(dataset.classes):
        raise ConfigError(f"target {target} is not a class index (0..{len(dataset.classes) - 1})")
    if not 0 <= rate <= 1:
        raise ConfigError(f"poisoning rate must be in [0, 1], got {rate}")
    candidates = (dataset.labels != target).nonzero().flatten()
    k = round(rate * len(dataset))
    if k > len(candidates):
        raise ConfigError(f"rate {rate} needs {k} non-target samples, only {len(candidates)} exist")
    g = torch.Generator().manual_seed(seed)
    rows = candidates[torch.randperm(len(candidates), generator=g)[:k]]
    mask = torch.zeros(len(dataset), dtype=torch.bool)
    mask[rows] = True
    images, labels = dataset.images.clone(), dataset.labels.clone()
    images[mask] = stamp(images[mask], trigger)
    labels[mask] = target
    name = f"{dataset.name}+{trigger_id(trigger)}->{target}@{rate:g}"
    return ImageDataset(images, labels, dataset.classes, name), mask


def triggered_test_set(dataset: ImageDataset, trigger: Trigger, target: int) -> ImageDataset:
    """For ASR: the non-target-class images, stamped, all labelled ``target``."""
    if not 0 <= target < len(dataset.classes):
        raise ConfigError(f"target {target} is not a class index (0..{len(dataset.classes) - 1})")
    keep = dataset.labels != target  # the ASR denominator excludes target-class images
    images = stamp(dataset.images[keep], trigger)
    labels = torch.full((len(images),), target, dtype=torch.int64)
    return ImageDataset(images, labels, dataset.classes, f"{dataset.name}+{trigger_id(trigger)}")


INVERTED_FILE = "report.inverted-triggers.safetensors"  # beside report.json; excluded from zips


def save_image_triggers(path: Path, triggers: Mapping[str, ImageTrigger | WarpTrigger]) -> None:
    """``triggers`` by id as tensors (``<id>/pattern``, ``<id>/mask``; a warp's ``<id>/offsets``),
    each one's kind and location in the metadata: an inverted trigger is too large for the
    report's JSON, which carries its sha256 (the spec's ``sha256``) and is read back with
    ``load_image_triggers``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for tid, t in triggers.items():
        if isinstance(t, WarpTrigger):
            tensors[f"{tid}/offsets"] = torch.tensor(t.offsets, dtype=torch.float32)
            meta[tid] = json.dumps({"kind": "warp"})
            continue
        tensors[f"{tid}/pattern"] = torch.tensor(t.pattern, dtype=torch.float32)
        if t.mask is not None:
            tensors[f"{tid}/mask"] = torch.tensor(t.mask, dtype=torch.float32)
        meta[tid] = json.dumps({"location": t.location})
    save_file(tensors, str(path), metadata=meta)


def load_image_triggers(path: Path) -> dict[str, ImageTrigger | WarpTrigger]:
    """What ``save_image_triggers`` wrote; {} when there is no such file."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    out: dict[str, ImageTrigger | WarpTrigger] = {}
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        for tid, raw in (f.metadata() or {}).items():
            info = json.loads(raw)
            if info.get("kind") == "warp":
                out[tid] = WarpTrigger(offsets=f.get_tensor(f"{tid}/offsets").tolist())
                continue
            location = info.get("location")
            mask = f.get_tensor(f"{tid}/mask") if f"{tid}/mask" in names else None
            out[tid] = from_tensor(f.get_tensor(f"{tid}/pattern"), mask,
                                   tuple(location) if location else None)
    return out


def digest(trigger: Trigger) -> str:
    """The short sha256 an inverted trigger's spec records (``spec["sha256"]``)."""
    return hashlib.sha256(trigger.model_dump_json().encode()).hexdigest()[:8]
