"""The on-disk cache of what trigger searches reach on the *reference* model.

An inverted trigger is judged against what the same search reaches without a backdoor: on the
reference, the base backbone with the suspect's head (``measure._inverted``). Heads are frozen
during fine-tuning (method.md, "Heads"), so every fine-tune of one base on one task has the same
reference, and those searches (half of the scan's inversion time) are run once per (base
revision, head, data, search) and read by every later scan, as BV_inj is (``bv_cache``).
Layout: ``<cache>/reference/<key>.json``, the ASR per target as hits and totals. The key also
holds a digest of the code that searches and measures, so a new version of it searches again.
Writes are atomic; two writers of one key write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergeshield import checkpoints, evaluation, inversion, triggers
from mergeshield.evaluation import Rate

if TYPE_CHECKING:
    from mergeshield.models import Classifier


def identity(clf: Classifier, base_revision: str, classes: tuple[str, ...], *data_sha256: str
             ) -> dict[str, Any] | None:
    """What a search on the reference ``clf`` depends on besides the search's own settings; None
    when the base has no revision to name it by (nothing is cached then)."""
    if not base_revision:
        return None
    device = next(clf.parameters()).device.type  # kernels differ a little between devices
    return {"base": base_revision, "head": _head_digest(clf), "classes": list(classes),
            "data": list(data_sha256), "device": device, "torch": torch.__version__,
            "code": _code_digest()}


def rates(cache_dir: str | Path | None, reference: Mapping[str, Any] | None,
          search: Mapping[str, Any], compute: Callable[[], list[Rate]]) -> list[Rate]:
    """The reference's ASR per target for ``search``: read from the cache, or ``compute``d and
    stored there (computed every time without a cache directory or a reference identity)."""
    if cache_dir is None or reference is None:
        return compute()
    payload = json.dumps({"reference": reference, "search": search}, sort_keys=True)
    path = Path(cache_dir) / "reference" / f"{hashlib.sha256(payload.encode()).hexdigest()}.json"
    try:
        return [Rate(int(h), int(t)) for h, t in json.loads(path.read_text())["rates"]]
    except (OSError, ValueError, KeyError, TypeError):  # absent, or not ours: search again
        pass
    found = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_write_text(path, json.dumps(
        {"search": search, "rates": [[r.hits, r.total] for r in found]}))
    return found


def _head_digest(clf: Classifier) -> str:
    """sha256 of every tensor of ``clf`` outside its backbone (the head, and for CLIP the text
    features and logit scale), by name, dtype, shape and bytes."""
    backbone = {t.data_ptr() for t in clf.backbone_state().values()}
    h = hashlib.sha256()
    for name, t in sorted(clf.state_dict().items()):
        if t.data_ptr() in backbone:
            continue
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@cache
def _code_digest() -> str:
    """sha256 of the modules whose code decides what a search finds and how ASR is counted."""
    h = hashlib.sha256()
    for module in (inversion, evaluation, triggers):
        h.update(Path(module.__file__ or "").read_bytes())
    return h.hexdigest()
