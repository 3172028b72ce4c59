"""The bench's seeded attack space: triggers drawn from families, not taken from a list.

Families (issue 12): ``patch`` (solid / checkerboard / random / shape, 2–6 px, any position, many
straddling the ViT's patch-token borders), ``blended`` (noise, stripes of any orientation and
period, another image; α 0.05–0.25), ``distributed`` (2–4 small patches) and ``warp`` (WaNet-style
smooth displacement field). Each attack is a pure function of ``(split, index)``: the split's seed
offset makes dev and test disjoint by construction. Patch, blended and distributed triggers are
``triggers.py`` triggers (stamped by ``triggers.stamp``); only the warp needs its own type.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from mergeshield.triggers import BlendedTrigger, PatchTrigger, Trigger, from_tensor, stamp

FAMILIES = ("patch", "blended", "distributed", "warp", "badmerging")
# seed offsets: attack i of a split has seed offset + i, its clean twin offset + CLEAN + i
# hold-outs are run once each and then spent: "test" (2026-12-05, docs/efficacy/test.md),
# "test2" (2026-12-06, test2.md), "test3" (2026-12-06 evening, test3.md), "test4" and "test5"
# (2026-12-07, test4.md, test5.md); a design changed after reading them is scored on test6
SPLIT_OFFSET: dict[str, int] = {"dev": 10_000, "test": 20_000, "ci": 30_000, "test2": 40_000,
                                "test3": 50_000, "test4": 60_000, "test5": 70_000,
                                "test6": 80_000}
CLEAN = 5_000  # clean fine-tunes of a split use seeds offset + CLEAN + i (i < CLEAN)
SHAPES = ("cross", "ring", "ell", "diagonal")


@dataclass(frozen=True)
class WaNetWarp:
    """WaNet (Nguyen & Tran, ICLR 2021): x' = grid_sample(x, identity + s/H · upsample(noise))."""

    grid: int  # k: side of the random control grid
    strength: float  # s: displacement in pixels (before clamping to the image)
    seed: int

    def field(self, h: int, w: int) -> Tensor:
        """(1, H, W, 2) sampling grid in [-1, 1]."""
        g = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.grid, self.grid, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()  # WaNet's normalisation
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack([xs, ys], dim=-1)[None]  # (1, H, W, 2), (x, y) order
        return (identity + self.strength * noise.permute(0, 2, 3, 1) / h).clamp(-1, 1)


HiddenTrigger = Trigger | WaNetWarp


def apply(trigger: HiddenTrigger, images: Tensor) -> Tensor:
    """Stamp ``trigger`` on (N, C, H, W) pixel-space images in [0, 1]; returns a new tensor."""
    if isinstance(trigger, WaNetWarp):
        n, _c, h, w = images.shape
        grid = trigger.field(h, w).to(images).expand(n, -1, -1, -1)
        return F.grid_sample(images, grid, align_corners=True).clamp(0, 1)
    return stamp(images, trigger)


@dataclass(frozen=True)
class Attack:
    """One drawn attack: which task, which target, which trigger (by its drawn parameters)."""

    split: str
    index: int
    seed: int  # draws the trigger, the poisoned rows and the fine-tune's batch order
    family: str
    task: str
    target: int
    params: dict[str, Any]  # the drawn trigger parameters (JSON); ``build_trigger`` reads them

    @property
    def id(self) -> str:
        return f"{self.split}-{self.index:03d}-{self.family}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "split": self.split, "index": self.index, "seed": self.seed,
                "family": self.family, "task": self.task, "target": self.target,
                "trigger": self.params}


def draw(split: str, index: int, tasks: tuple[str, ...], *, image_size: int = 28,
         classes: int = 10, families: tuple[str, ...] = FAMILIES, token: int = 7) -> Attack:
    """Attack ``index`` of ``split``: families round-robin, everything else drawn from the seed."""
    seed = SPLIT_OFFSET[split] + index
    rng = random.Random(seed)  # Python's Mersenne Twister: the same draws on every machine
    family = families[index % len(families)]
    task = rng.choice(tasks)
    target = rng.randrange(classes)
    draw_params = {"patch": _patch, "blended": _blended, "distributed": _distributed,
                   "warp": _warp, "badmerging": _badmerging}[family]
    params = draw_params(rng, image_size, token)
    return Attack(split, index, seed, family, task, target, params)


def draw_split(split: str, n: int, tasks: tuple[str, ...], **kw: Any) -> list[Attack]:
    """The first ``n`` attacks of ``split``."""
    return [draw(split, i, tasks, **kw) for i in range(n)]


def clean_seeds(split: str, n: int) -> list[int]:
    """Seeds of the split's clean fine-tunes (disjoint from every attack seed)."""
    return [SPLIT_OFFSET[split] + CLEAN + i for i in range(n)]


def _straddles(start: int, size: int, token: int) -> bool:
    return start // token != (start + size - 1) // token


def _patch(rng: random.Random, side: int, token: int) -> dict[str, Any]:
    size = rng.randint(2, 6)
    row, col = rng.randint(0, side - size), rng.randint(0, side - size)
    pattern = rng.choice(("solid", "checkerboard", "random", "shape"))
    out: dict[str, Any] = {"kind": "patch", "pattern": pattern, "size": size, "row": row,
                           "col": col, "pattern_seed": rng.randrange(2**31),
                           "straddles_tokens": _straddles(row, size, token)
                           or _straddles(col, size, token)}
    if pattern == "shape":
        out["shape"] = rng.choice(SHAPES)
        out["size"] = max(size, 3)  # a shape needs 3 px to be one
        out["row"], out["col"] = min(row, side - out["size"]), min(col, side - out["size"])
    return out


def _blended(rng: random.Random, side: int, token: int) -> dict[str, Any]:
    pattern = rng.choice(("noise", "stripes", "image"))
    out: dict[str, Any] = {"kind": "blended", "pattern": pattern,
                           "alpha": round(rng.uniform(0.05, 0.25), 3),
                           "pattern_seed": rng.randrange(2**31)}
    if pattern == "stripes":
        out["angle_deg"] = round(rng.uniform(0, 180), 1)
        out["period"] = round(rng.uniform(3, 10), 2)  # pixels per stripe pair
    if pattern == "image":
        out["image_index"] = rng.randrange(10**6)  # into the bench's pool of other images
    return out


def _distributed(rng: random.Random, side: int, token: int) -> dict[str, Any]:
    patches = []
    for _ in range(rng.randint(2, 4)):
        size = rng.randint(2, 3)
        patches.append({"size": size, "row": rng.randint(0, side - size),
                        "col": rng.randint(0, side - size),
                        "pattern": rng.choice(("solid", "checkerboard", "random"))})
    return {"kind": "distributed", "patches": patches, "pattern_seed": rng.randrange(2**31)}


def _warp(rng: random.Random, side: int, token: int) -> dict[str, Any]:
    return {"kind": "warp", "grid": rng.choice((3, 4, 5)),
            "strength": round(rng.uniform(2.0, 4.0), 3), "pattern_seed": rng.randrange(2**31)}


def _badmerging(rng: random.Random, side: int, token: int) -> dict[str, Any]:
    """BadMerging-On's patch: optimised on the base (``World.trigger``), drawn size and place."""
    size = rng.randint(4, 6)  # BadMerging's ~1 % of 224² is 0.7 token side: 5 px at 28 × 28
    row, col = rng.randint(0, side - size), rng.randint(0, side - size)
    return {"kind": "badmerging", "size": size, "row": row, "col": col,
            "pattern_seed": rng.randrange(2**31),
            "straddles_tokens": _straddles(row, size, token) or _straddles(col, size, token)}


def _shape_mask(shape: str, size: int) -> Tensor:
    """(size, size) binary mask of a small shape."""
    ij = torch.arange(size)
    mid = size // 2
    if shape == "cross":
        m = (ij[:, None] == mid) | (ij[None, :] == mid)
    elif shape == "ring":
        edge = torch.tensor([0, size - 1])
        m = torch.isin(ij, edge)[:, None] | torch.isin(ij, edge)[None, :]
    elif shape == "ell":
        m = (ij[None, :] == 0) | (ij[:, None] == size - 1)
    else:
        m = ij[:, None] == ij[None, :]
    return m.float()


def _small(pattern: str, size: int, c: int, g: torch.Generator) -> Tensor:
    """(C, size, size) pattern of one small patch."""
    if pattern == "random":
        return torch.rand(c, size, size, generator=g)
    if pattern == "checkerboard":
        ij = torch.arange(size)
        return ((ij[:, None] + ij[None, :]) % 2 == 0).float().expand(c, -1, -1).clone()
    return torch.ones(c, size, size)


def build_trigger(params: dict[str, Any], *, channels: int = 1, image_size: int = 28,
                  pool: Tensor | None = None) -> HiddenTrigger:
    """The trigger of drawn ``params``; ``pool``: (M, C, H, W) other images for image blends."""
    kind, g = params["kind"], torch.Generator().manual_seed(params["pattern_seed"])
    if kind == "badmerging":
        raise ValueError("a BadMerging patch is optimised on the base model: World.trigger")
    c, side = channels, image_size
    if kind == "warp":
        return WaNetWarp(params["grid"], params["strength"], params["pattern_seed"])
    if kind == "patch":
        loc = (params["row"], params["col"])
        if params["pattern"] != "shape":
            return PatchTrigger(pattern=params["pattern"], size=params["size"], location=loc,
                                seed=params["pattern_seed"])
        size = params["size"]
        return from_tensor(torch.ones(c, size, size), _shape_mask(params["shape"], size), loc)
    if kind == "distributed":
        pattern, mask = torch.zeros(c, side, side), torch.zeros(side, side)
        for p in params["patches"]:
            r, q, s = p["row"], p["col"], p["size"]
            pattern[:, r:r + s, q:q + s] = _small(p["pattern"], s, c, g)
            mask[r:r + s, q:q + s] = 1.0
        return from_tensor(pattern, mask)
    alpha = float(params["alpha"])
    if params["pattern"] == "noise":
        return BlendedTrigger(pattern="noise", alpha=alpha, seed=params["pattern_seed"])
    if params["pattern"] == "stripes":
        theta = math.radians(params["angle_deg"])
        ys, xs = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(),
                                indexing="ij")
        phase = (xs * math.cos(theta) + ys * math.sin(theta)) / params["period"]
        img = (torch.frac(phase) < 0.5).float().expand(c, -1, -1)
    else:
        if pool is None or len(pool) == 0:
            raise ValueError("an image blend needs a pool of other images")
        img = pool[params["image_index"] % len(pool)].expand(c, -1, -1)
    return from_tensor(img.clone(), torch.full((side, side), alpha))
