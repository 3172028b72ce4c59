"""model_card.py: the suspect's card names its base; a scan against another base is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeshield.errors import IncompatibleModelsError
from mergeshield.model_card import card_base_models, check_card_base
from mergeshield.pipeline import ScanContext, ScanRequest, resolve_inputs
from tests.support import hostile
from tests.support.hub import LoopbackHub


def _card(folder: Path, front_matter: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(f"---\n{front_matter}\n---\n# a fine-tune\n")
    return folder


@pytest.mark.parametrize(("front_matter", "names"), [
    ("base_model: org/base", ["org/base"]),
    ("base_model:\n- org/a\n- org/b", ["org/a", "org/b"]),
    ("base_model: https://huggingface.co/org/base", ["org/base"]),
    ("license: mit", []),
    ("base_model: [unclosed", []),  # unreadable YAML: no claim
    ("base_model: /etc/passwd", []),  # not a repo id
    ("base_model: {a: 1}", []),
])
def test_card_base_models(tmp_path: Path, front_matter: str, names: list[str]) -> None:
    assert card_base_models(_card(tmp_path / "m", front_matter)) == names


def test_no_card_or_no_front_matter_claims_nothing(tmp_path: Path) -> None:
    assert card_base_models(tmp_path) == []
    (tmp_path / "README.md").write_text("# base_model: org/x\n")
    assert card_base_models(tmp_path) == []


def test_the_hub_base_the_card_names_passes_and_another_is_refused(tmp_path: Path) -> None:
    suspect = _card(tmp_path / "s", "base_model:\n- Org/Base\n- org/other")
    check_card_base(suspect, "org/base", "hub", None)  # case does not matter on the hub
    with pytest.raises(IncompatibleModelsError) as info:
        check_card_base(suspect, "org/unrelated", "hub", None)
    assert "'Org/Base'" in info.value.message and "org/unrelated" in info.value.message
    assert info.value.details == {"card_base_model": ["Org/Base", "org/other"],
                                  "given_base": "org/unrelated"}


def test_a_local_base_is_recognised_by_the_repo_its_config_was_saved_from(tmp_path: Path
                                                                         ) -> None:
    suspect = _card(tmp_path / "s", "base_model: org/base")
    check_card_base(suspect, str(tmp_path / "b"), "directory", {"_name_or_path": "org/base"})
    with pytest.raises(IncompatibleModelsError, match="names no hub repo") as info:
        check_card_base(suspect, str(tmp_path / "b"), "directory",
                        {"_name_or_path": "/home/me/checkpoint-500"})
    assert str(tmp_path) not in info.value.message  # no server path in what users see


def test_a_card_without_base_model_is_not_checked(tmp_path: Path) -> None:
    check_card_base(_card(tmp_path / "s", "license: mit"), "org/any", "hub", None)


def test_through_the_hub_the_card_is_fetched_and_checked(hub: LoopbackHub, tmp_path: Path
                                                         ) -> None:
    base = hostile.save_base(tmp_path / "base")
    state, config = hostile.vit(0)
    suspect = hostile._model(tmp_path / "suspect", state, config,
                             README__md="---\nbase_model: zoo/base\n---\n")
    hub.add_repo("zoo/base", base)
    hub.add_repo("zoo/other", base)
    hub.add_repo("zoo/suspect", suspect)
    ctx = ScanContext(endpoint=hub.url, cache_dir=tmp_path / "cache")
    got, _ = resolve_inputs(ScanRequest(suspect="zoo/suspect", base="zoo/base"), ctx)
    assert (got.root / "README.md").is_file()
    with pytest.raises(IncompatibleModelsError):
        resolve_inputs(ScanRequest(suspect="zoo/suspect", base="zoo/other"), ctx)
    config_named = tmp_path / "named"
    hostile._model(config_named, *hostile.vit(0))
    (config_named / "config.json").write_text(json.dumps({**config, "_name_or_path": "zoo/base"}))
    resolve_inputs(ScanRequest(suspect="zoo/suspect", base=str(config_named)), ctx)
