"""reference_cache.py: the reference's searches are run once per reference and read back
identical; anything that changes the reference, the data or the search is another entry."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergeshield import reference_cache
from mergeshield.evaluation import Rate
from mergeshield.measure import SearchKind, _inverted
from mergeshield.pipeline import ScanRequest
from tests.support.tiny import TinyNet, block_task

CLASSES = ("c0", "c1", "c2", "c3")


def with_backbone_of(clf: TinyNet, seed: int) -> TinyNet:
    """``clf``'s head on another backbone: another fine-tune of the same base and task."""
    other = TinyNet(4, seed=seed)
    other.classifier.load_state_dict(clf.classifier.state_dict())
    return other


def test_a_fine_tune_of_the_same_base_and_task_reads_the_first_ones_search(tmp_path: Path
                                                                          ) -> None:
    ref = TinyNet(4)
    data = block_task(64, seed=0)
    calls: list[str] = []

    def compute() -> list[Rate]:
        calls.append("searched")
        return [Rate(3, 48), Rate(0, 48), Rate(48, 48), Rate(7, 48)]

    # the reference of two suspects with one head is one model: one identity, one search
    first = reference_cache.identity(ref, "sha-of-base", CLASSES, data.sha256())
    again = reference_cache.identity(with_backbone_of(ref, 5), "sha-of-base", CLASSES,
                                     data.sha256())
    assert first == again
    search = {"kind": "inverted", "steps": 60}
    got = reference_cache.rates(tmp_path, first, search, compute)
    assert reference_cache.rates(tmp_path, again, search, compute) == got
    assert calls == ["searched"]
    [entry] = (tmp_path / "reference").iterdir()
    assert json.loads(entry.read_text())["rates"] == [[3, 48], [0, 48], [48, 48], [7, 48]]

    # another search, base, head, class list or data: searched again
    reference_cache.rates(tmp_path, first, {**search, "steps": 30}, compute)
    other_head = TinyNet(4, seed=1)
    for identity in (reference_cache.identity(ref, "sha-of-another-base", CLASSES, data.sha256()),
                     reference_cache.identity(other_head, "sha-of-base", CLASSES, data.sha256()),
                     reference_cache.identity(ref, "sha-of-base", CLASSES[::-1], data.sha256()),
                     reference_cache.identity(ref, "sha-of-base", CLASSES,
                                              block_task(64, seed=1).sha256())):
        assert identity != first
        reference_cache.rates(tmp_path, identity, search, compute)
    assert len(calls) == 6 and len(list((tmp_path / "reference").iterdir())) == 6


def test_no_cache_folder_or_no_base_revision_searches_every_time(tmp_path: Path) -> None:
    ref = TinyNet(4)
    assert reference_cache.identity(ref, "", CLASSES, "data") is None  # nothing names the base
    calls: list[int] = []

    def compute() -> list[Rate]:
        calls.append(1)
        return [Rate(1, 2)]

    known = reference_cache.identity(ref, "sha-of-base", CLASSES, "data")
    for cache_dir, identity in ((None, known), (tmp_path, None), (tmp_path, None)):
        assert reference_cache.rates(cache_dir, identity, {}, compute) == [Rate(1, 2)]
    assert len(calls) == 3 and not (tmp_path / "reference").exists()


def test_an_unreadable_entry_is_searched_again_and_rewritten(tmp_path: Path) -> None:
    identity = reference_cache.identity(TinyNet(4), "sha-of-base", CLASSES, "data")
    reference_cache.rates(tmp_path, identity, {}, lambda: [Rate(1, 4)])
    [entry] = (tmp_path / "reference").iterdir()
    for broken in ("{not json", json.dumps({"rates": [["x", 4]]}), json.dumps([1, 2])):
        entry.write_text(broken)
        assert reference_cache.rates(tmp_path, identity, {}, lambda: [Rate(2, 4)]) == [Rate(2, 4)]
        assert json.loads(entry.read_text())["rates"] == [[2, 4]]


def test_the_scans_inverted_finding_is_the_same_read_from_the_cache(tmp_path: Path) -> None:
    """``measure._inverted`` with the reference's side computed, then read back: the same
    baseline, the same trigger, the same spec."""
    sus, ref = TinyNet(4, seed=0), TinyNet(4, seed=1)
    ref.classifier.load_state_dict(sus.classifier.state_dict())
    opt, test = block_task(96, seed=2), block_task(96, seed=3)
    request = ScanRequest(suspect="s", base="b", evaluation="e", inversion_steps=6)
    identity = reference_cache.identity(ref, "sha-of-base", CLASSES, opt.sha256(), test.sha256())

    def scan_side(search_: tuple[SearchKind, float], cache_dir: Path | None) -> dict[str, object]:
        torch.manual_seed(0)
        probe = _inverted(request, opt, test, ref, sus, *search_,
                          lambda search, compute: reference_cache.rates(cache_dir, identity,
                                                                        search, compute))
        assert probe.ref is not None and probe.before is not None
        return {"id": probe.id, "spec": probe.spec, "ref": probe.ref, "before": probe.before}

    searches: list[tuple[SearchKind, float]] = [("patch", 1.0), ("blend", 0.1), ("warp", 2.0)]
    for search_ in searches:
        computed = scan_side(search_, None)
        assert scan_side(search_, tmp_path) == computed  # searched, stored
        assert scan_side(search_, tmp_path) == computed  # read back
    assert len(list((tmp_path / "reference").iterdir())) == 3  # the patch, blend and warp search
