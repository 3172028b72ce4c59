"""The new-scan form's fields → the API's request body: its defaults are the API's defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.dashboard.forms import defaults, errors_of, scan_create
from service.schemas import ScanOptions

HUB = {"suspect_hub": "org/suspect", "base_hub": "org/base", "evaluation": "mnist5k"}


def test_the_untouched_form_asks_for_the_api_defaults() -> None:
    body = scan_create({**defaults(), **HUB})
    assert body.options == ScanOptions()
    assert (body.suspect.hub, body.base.hub, body.device) == ("org/suspect", "org/base", "auto")
    assert body.suspect.upload is None and body.callback_url is None and not body.force


def test_fields_and_unticked_boxes_reach_the_request() -> None:
    form = {**defaults(), **HUB, "lambdas": "0, 0.5 ,1", "budget_points": "3",
            "suspect_hub": "", "suspect_upload": "a" * 32, "suspect_revision": "",
            "base_revision": "v1", "recipe_epochs": "2", "focus_keep": "1", "force": "on"}
    for box in ("inversion", "probes", "focus_agree"):
        form.pop(box)
    body = scan_create(form)
    assert body.suspect.upload == "a" * 32 and body.base.revision == "v1"
    assert body.options.lambdas == [0.0, 0.5, 1.0] and body.options.budget_points == 3.0
    assert not body.options.inversion and not body.options.probes
    assert body.options.recipe.epochs == 2 and body.options.focus.keep == 1.0
    assert not body.options.focus.agree_with_suspect and body.force


def test_bad_fields_are_named() -> None:
    with pytest.raises(ValidationError) as caught:
        scan_create({**defaults(), **HUB, "suspect_upload": "b" * 32, "lambdas": "0, x",
                     "evaluation": "../etc"})
    lines = errors_of(caught.value)
    assert any(line.startswith("suspect:") and "exactly one" in line for line in lines)
    assert any(line.startswith("options.lambdas.1:") for line in lines)
    assert any(line.startswith("evaluation:") for line in lines)
