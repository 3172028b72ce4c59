"""resolve() against the loopback hub, through the real huggingface_hub client."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, hf_hub_download, snapshot_download
from safetensors.torch import save_file

from mergeshield import checkpoints as ck
from mergeshield import hub as hub_module
from mergeshield.data_sources import download_dataset
from mergeshield.errors import HubError, SourceNotFoundError, UnsafeFormatError
from tests.support.hub import LoopbackHub

WRONG_TOKEN = "hf_wrong_token_must_not_leak_42"


def _model(folder: Path, fill: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": torch.full((4, 3), fill), "head.bias": torch.zeros(2)},
              folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text('{"model_type": "toy", "architectures": ["Toy"]}')
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _fill(src: ck.ResolvedSource) -> float:
    with ck.open_checkpoint(src) as weights:
        return float(weights["encoder.weight"][0, 0])


def test_download_and_revision_pinning(hub: LoopbackHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old = hub.add_repo("acme/toy", _model(tmp_path / "v1", 1.0))
    first = ck.resolve("acme/toy", endpoint=hub.url, cache_dir=cache)
    assert (first.kind, first.revision_requested, first.revision) == ("hub", None, old)
    assert first.config == {"model_type": "toy", "architectures": ["Toy"]}
    assert {p for p, _, _ in first.files_digest()} == {"model.safetensors", "config.json"}
    assert (first.root / "tokenizer.json").is_file() and _fill(first) == 1.0

    new = hub.add_repo("acme/toy", _model(tmp_path / "v2", 2.0))
    assert new != old
    latest = ck.resolve("acme/toy", revision="main", endpoint=hub.url, cache_dir=cache)
    assert (latest.revision_requested, latest.revision, _fill(latest)) == ("main", new, 2.0)
    pinned = ck.resolve("acme/toy", revision=old, endpoint=hub.url, cache_dir=cache)
    assert (pinned.revision, _fill(pinned)) == (old, 1.0)
    # the model was downloaded at the sha only: no file request names the branch
    assert not [r for r in hub.requests if "/resolve/main/" in r]


def test_missing_repo_and_revision(hub: LoopbackHub, tmp_path: Path) -> None:
    hub.add_repo("acme/toy", _model(tmp_path / "m", 1.0))
    with pytest.raises(SourceNotFoundError, match="'acme/nothing'.*check the repo id"):
        ck.resolve("acme/nothing", endpoint=hub.url, cache_dir=tmp_path / "c")
    with pytest.raises(SourceNotFoundError, match="'acme/toy' at revision 'v9'"):
        ck.resolve("acme/toy", revision="v9", endpoint=hub.url, cache_dir=tmp_path / "c")


def test_private_repo_needs_the_token(hub: LoopbackHub, tmp_path: Path) -> None:
    sha = hub.add_repo("acme/secret", _model(tmp_path / "m", 3.0), private=True)
    for token in (None, WRONG_TOKEN):
        with pytest.raises(SourceNotFoundError, match="token") as info:
            ck.resolve("acme/secret", token=token, endpoint=hub.url, cache_dir=tmp_path / "c")
        assert WRONG_TOKEN not in str(info.value) + repr(info.value.to_dict())
        assert info.value.__context__ is None and info.value.__cause__ is None
    src = ck.resolve("acme/secret", token=hub.token, endpoint=hub.url, cache_dir=tmp_path / "c")
    assert src.revision == sha and _fill(src) == 3.0 and hub.token not in repr(src)


@pytest.mark.parametrize("status", [500, 503, None])
def test_hub_down_is_hub_error(hub: LoopbackHub, tmp_path: Path, status: int | None,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "RETRY_DELAYS", (0.01, 0.01))
    hub.add_repo("acme/toy", _model(tmp_path / "m", 1.0))
    if status is None:
        hub.stop()
    else:
        hub.fail_with(status)
    with pytest.raises(HubError) as info:
        ck.resolve("acme/toy", token=WRONG_TOKEN, endpoint=hub.url, cache_dir=tmp_path / "c")
    assert WRONG_TOKEN not in str(info.value) + repr(info.value.to_dict())
    if status is not None:  # tried once and retried twice, then given up
        assert len([r for r in hub.requests if r.startswith("GET /api/models/")]) == 3


def test_a_hub_blip_is_ridden_out(hub: LoopbackHub, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503 that is over before the retries are: the download succeeds."""
    sha = hub.add_repo("acme/toy", _model(tmp_path / "m", 1.0))
    hub.fail_with(503)
    monkeypatch.setattr(hub_module.time, "sleep", lambda _s: hub.fail_with(None))
    assert ck.resolve("acme/toy", endpoint=hub.url, cache_dir=tmp_path / "c").revision == sha


def test_a_hung_hub_times_out(hub: LoopbackHub, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request is bounded by huggingface_hub's timeout, the tree listing included."""
    hub.add_repo("acme/toy", _model(tmp_path / "m", 1.0))
    hub.add_repo("acme/data", _model(tmp_path / "d", 1.0), repo_type="dataset")
    monkeypatch.setattr(hub_module, "RETRY_DELAYS", ())
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    hub.slow(5)
    with pytest.raises(HubError, match="ReadTimeout"):
        ck.resolve("acme/toy", endpoint=hub.url, cache_dir=tmp_path / "c")
    with pytest.raises(HubError, match="ReadTimeout"):
        download_dataset("acme/data", None, None, hub.url, tmp_path / "c")
    hub.slow(0)


def test_offline_uses_the_cache(hub: LoopbackHub, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    sha = hub.add_repo("acme/toy", _model(tmp_path / "m", 1.0))
    online = ck.resolve("acme/toy", endpoint=hub.url, cache_dir=cache)
    hub.stop()
    by_flag = ck.resolve("acme/toy", endpoint=hub.url, cache_dir=cache, local_files_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_env = ck.resolve("acme/toy", endpoint=hub.url, cache_dir=cache)
    by_sha = ck.resolve("acme/toy", revision=sha, endpoint=hub.url, cache_dir=cache)
    for src in (by_flag, by_env, by_sha):
        assert src.revision == sha and src.files_digest() == online.files_digest()
    with pytest.raises(HubError, match="offline"):
        ck.resolve("acme/toy", endpoint=hub.url, cache_dir=tmp_path / "empty")


def test_code_only_repo_is_refused(hub: LoopbackHub, tmp_path: Path) -> None:
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "evil"}')
    (folder / "modeling_evil.py").write_text("import os\nos.system('touch pwned')\n")
    hub.add_repo("acme/evil", folder)
    with pytest.raises(UnsafeFormatError, match="Python model code"):
        ck.resolve("acme/evil", endpoint=hub.url, cache_dir=tmp_path / "c")


def test_dataset_repos_are_served(hub: LoopbackHub, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "data-00000-of-00001.arrow").write_bytes(b"\x00" * 100)
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}')
    sha = hub.add_repo("acme/data", folder, repo_type="dataset")
    got = Path(snapshot_download("acme/data", repo_type="dataset", endpoint=hub.url,
                                 cache_dir=tmp_path / "c"))
    assert got.name == sha
    assert (got / "train" / "data-00000-of-00001.arrow").read_bytes() == b"\x00" * 100
    one = hf_hub_download("acme/data", "dataset_dict.json", repo_type="dataset",
                          endpoint=hub.url, cache_dir=tmp_path / "c2")
    assert Path(one).read_text() == '{"splits": ["train"]}'
    shutil.rmtree(tmp_path / "c2")


class _Stop(Exception):
    pass


def test_a_cancelled_scan_stops_a_download_between_two_chunks(hub: LoopbackHub,
                                                              tmp_path: Path) -> None:
    """The download is a cancellation point: the check raises at the first chunk of the weights,
    so neither the weights nor the snapshot are there, and the next download (no check) works."""
    from mergeshield import cancellation

    folder = _model(tmp_path / "m", 1.0)
    save_file({"encoder.weight": torch.zeros(2**20, 4)}, folder / "model.safetensors")  # 16 MB
    hub.add_repo("acme/big", folder)
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 2:  # after the file loop's check and the first chunk
            raise _Stop

    cache = tmp_path / "cache"
    with cancellation.checked_by(check), pytest.raises(_Stop):
        hub_module.download_repo("acme/big", revision=None, token=None, endpoint=hub.url,
                                 cache_dir=cache, patterns=["*.safetensors"])
    assert not list(cache.rglob("snapshots/*/model.safetensors"))
    src = ck.resolve("acme/big", endpoint=hub.url, cache_dir=cache)
    with ck.open_checkpoint(src) as weights:
        assert weights["encoder.weight"].shape == (2**20, 4)
