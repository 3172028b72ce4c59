"""Triggers: stamping properties, parsing, poisoning and the ASR test set."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from mergeshield.data import ImageDataset
from mergeshield.errors import ConfigError
from mergeshield.triggers import (
    INVERTED_FILE,
    BlendedTrigger,
    ImageTrigger,
    PatchTrigger,
    WarpTrigger,
    digest,
    from_tensor,
    load_image_triggers,
    parse_trigger,
    poison,
    preview_png,
    save_image_triggers,
    stamp,
    trigger_id,
    triggered_test_set,
)


def _images(n: int = 6, c: int = 1, h: int = 12, w: int = 10) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(1))


def _dataset(n: int = 200, classes: int = 4) -> ImageDataset:
    labels = torch.arange(n) % classes
    names = tuple(str(i) for i in range(classes))
    return ImageDataset(_images(n), labels.to(torch.int64), names, "toy/train")


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("pattern", ["solid", "checkerboard", "random"])
def test_patch_changes_only_its_region_and_leaves_input(c: int, pattern: str) -> None:
    x = _images(c=c)
    before = x.clone()
    t = PatchTrigger(pattern=pattern, size=3, location="bottom_right", margin=1)  # type: ignore[arg-type]
    y = stamp(x, t)
    assert torch.equal(x, before)
    region = torch.zeros(12, 10, dtype=torch.bool)
    region[8:11, 6:9] = True
    assert torch.equal(y[..., ~region], x[..., ~region])
    assert not torch.equal(y[..., region], x[..., region])
    assert torch.equal(y, stamp(x, t))  # deterministic


@pytest.mark.parametrize(("loc", "row", "col"), [
    ("top_left", 1, 1), ("top_right", 1, 6), ("bottom_left", 8, 1), ("center", 4, 3),
    ((2, 5), 2, 5)])
def test_patch_locations(loc: str | tuple[int, int], row: int, col: int) -> None:
    y = stamp(torch.full((1, 1, 12, 10), 0.5), PatchTrigger(pattern="solid", location=loc))  # type: ignore[arg-type]
    changed = (y[0, 0] != 0.5).nonzero()
    assert changed.min(0).values.tolist() == [row, col] and len(changed) == 9


def test_checkerboard_values() -> None:
    t = PatchTrigger(size=2, location="top_left", margin=0, value=0.8)
    y = stamp(torch.zeros(1, 1, 5, 5), t)
    assert torch.allclose(y[0, 0, :2, :2], torch.tensor([[0.8, 0.2], [0.2, 0.8]]))


def test_patch_must_fit() -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        stamp(_images(), PatchTrigger(size=11))
    with pytest.raises(ConfigError, match="does not fit"):
        stamp(_images(), PatchTrigger(location=(10, 0)))


@pytest.mark.parametrize("pattern", ["noise", "stripes"])
def test_blended_formula(pattern: str) -> None:
    x = _images(c=3)
    t = BlendedTrigger(pattern=pattern, alpha=0.2)  # type: ignore[arg-type]
    zeros, ones = stamp(torch.zeros_like(x), t), stamp(torch.ones_like(x), t)
    pat = zeros / 0.2  # alpha * pattern on black images
    assert torch.allclose(ones, 0.8 + 0.2 * pat, atol=1e-6)
    assert torch.allclose(stamp(x, t), 0.8 * x + 0.2 * pat, atol=1e-6)
    assert torch.equal(stamp(x, t), stamp(x.clone(), t))
    if pattern == "noise":
        assert not torch.equal(stamp(x, t), stamp(x, BlendedTrigger(alpha=0.2, seed=1)))


def test_image_trigger_full_and_patch() -> None:
    x = _images(c=3)
    pattern = torch.rand(3, 12, 10)
    mask = torch.zeros(12, 10)
    mask[:2] = 0.5
    y = stamp(x, from_tensor(pattern, mask))
    assert torch.allclose(y, (1 - mask) * x + mask * pattern, atol=1e-6)
    patch = from_tensor(torch.ones(1, 2, 2), None, location=(3, 4))
    y = stamp(x, patch)
    assert torch.equal(y[:, :, 3:5, 4:6], torch.ones(6, 3, 2, 2))
    assert y.sub(x).abs().gt(0).sum() <= 6 * 3 * 4
    with pytest.raises(ConfigError, match="12x10"):
        stamp(torch.rand(1, 3, 8, 8), from_tensor(pattern, mask))
    with pytest.raises(ConfigError):
        from_tensor(torch.full((1, 2, 2), 2.0), None)


def test_parse_trigger_forms() -> None:
    assert parse_trigger("patch:checkerboard:3:bottom_right") == PatchTrigger()
    assert parse_trigger("patch") == PatchTrigger()
    assert parse_trigger("patch:solid:4:2,5:value=0.5") == PatchTrigger(
        pattern="solid", size=4, location=(2, 5), value=0.5)
    assert parse_trigger("blended:noise:0.15") == BlendedTrigger()
    assert parse_trigger({"kind": "blended", "alpha": 0.1}) == BlendedTrigger(alpha=0.1)
    assert parse_trigger('{"kind": "patch", "size": 5}') == PatchTrigger(size=5)
    img = ImageTrigger(pattern=[[[0.0, 1.0]]], location=(0, 0))
    assert parse_trigger(img.model_dump_json()) == img
    for t in (PatchTrigger(location=(1, 2)), BlendedTrigger(pattern="stripes"), img):
        assert parse_trigger(t.model_dump()) == t


@pytest.mark.parametrize("spec", [
    "nope:1", "patch:hexagon", "patch:solid:0", "blended:noise:1.5", "patch:solid:3:middle",
    "patch:solid:3:center:extra", "patch:size=x", '{"kind": "patch"', {"kind": "image"},
    {"kind": "patch", "colour": 1}, {"kind": "image", "pattern": [[[0.5]]], "mask": [[1, 1]]}])
def test_parse_trigger_errors(spec: str | dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        parse_trigger(spec)


def test_trigger_ids() -> None:
    assert trigger_id(PatchTrigger()) == "patch-checkerboard-3-bottom_right"
    assert trigger_id(PatchTrigger(location=(4, 2))) == "patch-checkerboard-3-r4c2"
    assert trigger_id(BlendedTrigger()) == "blended-noise-0.15"
    img = ImageTrigger(pattern=[[[0.5]]])
    assert trigger_id(img).startswith("image-") and len(trigger_id(img)) == 14
    assert trigger_id(img) == trigger_id(ImageTrigger(pattern=[[[0.5]]]))
    assert trigger_id(img) != trigger_id(ImageTrigger(pattern=[[[0.25]]]))
    assert trigger_id(PatchTrigger(margin=2)) != trigger_id(PatchTrigger())


def test_poison_rows_count_and_determinism() -> None:
    ds = _dataset()
    t = PatchTrigger()
    poisoned, mask = poison(ds, t, target=2, rate=0.1, seed=7)
    assert mask.dtype == torch.bool and int(mask.sum()) == 20
    assert not bool((ds.labels[mask] == 2).any())
    assert bool((poisoned.labels[mask] == 2).all())
    assert torch.equal(poisoned.labels[~mask], ds.labels[~mask])
    assert torch.equal(poisoned.images[~mask], ds.images[~mask])
    assert torch.equal(poisoned.images[mask], stamp(ds.images[mask], t))
    again, mask2 = poison(ds, t, target=2, rate=0.1, seed=7)
    assert torch.equal(mask, mask2) and torch.equal(again.images, poisoned.images)
    assert not torch.equal(poison(ds, t, target=2, rate=0.1, seed=8)[1], mask)
    assert torch.equal(ds.labels, torch.arange(200) % 4)  # input untouched
    with pytest.raises(ConfigError):
        poison(ds, t, target=2, rate=0.9, seed=0)  # only 150 non-target rows
    with pytest.raises(ConfigError):
        poison(ds, t, target=4, rate=0.1, seed=0)


def test_triggered_test_set_excludes_target() -> None:
    ds = _dataset(n=40)
    asr = triggered_test_set(ds, BlendedTrigger(), target=1)
    assert len(asr) == 30 and bool((asr.labels == 1).all())
    assert torch.equal(asr.images, stamp(ds.images[ds.labels != 1], BlendedTrigger()))


@pytest.mark.parametrize("c", [1, 3])
def test_preview_png(c: int) -> None:
    data = preview_png(_images(c=c)[0], PatchTrigger(), scale=3)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(data))
    assert img.size == (30, 36) and img.mode == ("L" if c == 1 else "RGB")


def test_image_triggers_round_trip_through_their_file(tmp_path: Path) -> None:
    """What a scan stores beside its report comes back with the digest its spec records."""
    g = torch.Generator().manual_seed(0)
    full = from_tensor(torch.rand(1, 8, 8, generator=g), (torch.rand(8, 8, generator=g) > 0.8)
                       .float())
    small = from_tensor(torch.rand(3, 2, 2, generator=g), None, location=(5, 1))
    bent = WarpTrigger(offsets=(torch.rand(2, 4, 4, generator=g) * 2 - 1).tolist())
    path = tmp_path / INVERTED_FILE
    found = {"inverted:patch:target-3": full, "inverted:blend:target-0": small,
             "inverted-warp:target-1": bent}
    save_image_triggers(path, found)
    back = load_image_triggers(path)
    assert back == found
    assert digest(back["inverted:patch:target-3"]) == digest(full)
    assert load_image_triggers(tmp_path / "none.safetensors") == {}


def test_a_warp_trigger_is_validated_and_a_zero_warp_changes_nothing() -> None:
    with pytest.raises(ConfigError, match="offsets"):
        parse_trigger({"kind": "warp", "offsets": [[[0.0, 0.0], [0.0, 0.0]]]})  # one channel
    with pytest.raises(ConfigError, match="finite"):
        parse_trigger({"kind": "warp", "offsets": [[[1e9] * 2] * 2] * 2})
    ok = parse_trigger({"kind": "warp", "offsets": [[[0.5] * 3] * 3] * 2})
    assert isinstance(ok, WarpTrigger) and trigger_id(ok).startswith("warp-")
    images = _images()
    assert torch.allclose(stamp(images, WarpTrigger(offsets=[[[0.0] * 4] * 4] * 2)), images,
                          atol=1e-5)
    one_right = WarpTrigger(offsets=[[[1.0] * 4] * 4, [[0.0] * 4] * 4])  # sample 1 px to the right
    assert torch.allclose(stamp(images, one_right)[..., :-1], images[..., 1:], atol=1e-5)
    assert preview_png(images[0], one_right).startswith(b"\x89PNG")
