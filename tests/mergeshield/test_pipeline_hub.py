"""Scanning by Hugging Face repo id, through the real client and a loopback hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeshield.errors import SourceNotFoundError
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from mergeshield.unlearning import UnlearnConfig
from tests.support.hub import LoopbackHub
from tests.support.zoo import Zoo


def test_scan_by_repo_id_records_resolved_revisions_and_works_offline(
    zoo: Zoo, hub: LoopbackHub, tmp_path: Path, bv_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_sha = hub.add_repo("zoo/vit-base", zoo.path("vit-base"))
    sus_sha = hub.add_repo("acme/vit-mnist", zoo.path("vit-mnist-badnets"), private=True)
    data_sha = hub.add_repo("zoo/mnist", zoo.dataset("vit-mnist-badnets"), repo_type="dataset")
    request = ScanRequest(suspect="acme/vit-mnist", base="zoo/vit-base", evaluation="zoo/mnist",
                          inversion=False, unlearning=UnlearnConfig(enabled=False))
    cache = tmp_path / "hub-cache"
    report = scan(request, ScanContext(endpoint=hub.url, token=hub.token, cache_dir=cache))
    assert report.suspect.kind == "hub" and report.suspect.revision == sus_sha
    assert report.suspect.revision_requested is None
    assert report.base.revision == base_sha
    assert report.verdict.status == "backdoor_suspected"
    assert hub.token not in report.model_dump_json()
    assert data_sha

    # --offline (local_files_only) with the hub still up: nothing is asked of it, the
    # evaluation dataset included (issue 15: it used to go to the network)
    hub.requests.clear()
    again = scan(request, ScanContext(endpoint=hub.url, token=hub.token, cache_dir=cache,
                                      local_files_only=True))
    assert hub.requests == [] and again.evaluation == report.evaluation

    # the same scan with the hub gone, from the cache the first run filled
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = scan(request, ScanContext(endpoint=hub.url, cache_dir=cache, local_files_only=True))
    assert offline.suspect.revision == sus_sha
    assert [f.sha256 for f in offline.suspect.files] == [f.sha256 for f in report.suspect.files]


def test_private_repo_without_token_is_a_clear_error(zoo: Zoo, hub: LoopbackHub,
                                                    tmp_path: Path) -> None:
    hub.add_repo("zoo/vit-base", zoo.path("vit-base"))
    hub.add_repo("acme/secret", zoo.path("vit-mnist-clean"), private=True)
    with pytest.raises(SourceNotFoundError):
        scan(ScanRequest(suspect="acme/secret", base="zoo/vit-base"),
             ScanContext(endpoint=hub.url, cache_dir=tmp_path))
