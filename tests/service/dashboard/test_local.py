"""The dashboard under ``mergeshield serve`` without ``--auth``: no sign-in, but a page elsewhere
still cannot post the dashboard's forms (the app in-process; the browser tests use real ones)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mergeshield.settings import Settings
from service.dashboard.forms import defaults
from service.main import create_app

FORM = {**defaults(), "suspect_hub": "org/suspect", "base_hub": "org/base",
        "evaluation": "mnist5k"}


@pytest.fixture
def local(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                        auth_disabled=True)
    with TestClient(create_app(settings, reconciler=False)) as client:
        yield client


def test_pages_need_no_sign_in(local: TestClient) -> None:
    assert local.get("/ui/signin", follow_redirects=False).headers["location"] == "/ui/"
    for url in ("/ui/", "/ui/scans/new", "/ui/bv-cache", "/ui/webhooks"):
        page = local.get(url)
        assert page.status_code == 200, url
        assert "authentication off" in page.text and "Sign out" not in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
    assert local.get("/", follow_redirects=False).headers["location"] == "/ui/"


def test_a_form_posted_from_elsewhere_is_refused_and_starts_nothing(local: TestClient) -> None:
    forged = local.post("/ui/scans", data=FORM, headers={"Origin": "https://evil.example"})
    assert forged.status_code == 403
    assert local.get("/v1/scans").json()["total"] == 0
    ours = local.post("/ui/scans", data=FORM, headers={"Origin": "http://testserver"},
                      follow_redirects=False)
    assert ours.status_code == 303 and ours.headers["location"].startswith("/ui/scans/")
    scan = local.get("/v1/scans").json()["items"][0]
    assert (scan["suspect"], scan["state"]) == ("org/suspect", "queued")


def test_a_bad_form_comes_back_with_its_values_and_the_reasons(local: TestClient) -> None:
    page = local.post("/ui/scans", data={**FORM, "lambdas": "0, oops", "base_hub": ""},
                      headers={"Origin": "http://testserver"})
    assert page.status_code == 422
    assert "The scan was not started" in page.text and "options.lambdas.1" in page.text
    assert 'value="0, oops"' in page.text and 'value="org/suspect"' in page.text
    assert local.get("/v1/scans").json()["total"] == 0
