"""The watches page in a real browser (issue 17): a watch that names a merge plan says so: which
repos' commits re-run the plan, which entries follow ``main`` and which stay at their commit, and
after a signed Hub push, a link to the merge it queued; a scan's watch beside it says what it
scans; nothing overflows a phone's width."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.service.conftest import CLEAN, Published
from tests.support.browser import PHONE, shoot, signed_in
from tests.support.hub_payloads import repo_content
from tests.support.stack import Stack
from tests.support.zoo import Zoo

SECRET = "hub-webhook-secret-for-the-watches-page"


@pytest.fixture(scope="module")
def stack(published: Published, bv_cache_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("watch-pages"), "sqlite-filesystem",
               env=published.env(bv_cache_dir, MERGESHIELD_WEBHOOK_SECRET=SECRET)) as s:
        yield s.serve()


def test_a_plans_watch_shows_its_plan_its_pins_and_the_merge_a_push_queued(
        page: Page, stack: Stack, admin: httpx.Client, zoo: Zoo, published: Published) -> None:
    model, base = f"zoo/{CLEAN}", f"zoo/{zoo.model(CLEAN)['base']}"
    head = published.hub.repos[("model", model)].branches["main"]
    plan = {"merge_method": "task_arithmetic", "base_model": base,
            "models": [{"model": model}, {"model": f"{model}@{head}"}]}
    watch = admin.post("/v1/watches", json={"merge": plan, "rate_limit": 5}).json()
    scans = admin.post("/v1/watches", json={"repo": "zoo/", "prefix": True,
                                             "scan": {"base": {"hub": base}}}).json()
    page.get_by_role("link", name="Watches").click()
    expect(page.get_by_role("heading", name="Watches")).to_be_visible()
    row = page.locator(f'tr[data-watch="{watch["id"]}"]')
    expect(row.locator('[data-field="repos"]')).to_have_text(f"{base}, {model}")
    expect(row.locator('[data-field="plan"]')).to_contain_text("Re-runs its merge plan")
    expect(row.locator('[data-field="plan"]')).to_contain_text(
        f"A new commit on main of {base} or {model} queues the plan again as a merge")
    pins = row.locator('[data-field="pin"]')
    expect(pins).to_have_text(["follows main", "follows main", f"stays at commit {head[:10]}"])
    expect(row.locator('[data-field="last-merge"]')).to_have_text("none yet")
    other = page.locator(f'tr[data-watch="{scans["id"]}"]')
    expect(other).to_have_attribute("data-kind", "scan")
    expect(other.locator('[data-field="plan"]')).to_contain_text(f"Scans the commit against {base}")
    expect(other.locator('[data-field="last-merge"]')).to_have_count(0)

    new = "4" * 40  # a commit the loopback hub does not have: the merge fails, the link stays
    r = httpx.post(f"{stack.url}/v1/webhooks/huggingface", json=repo_content(model, new),
                   headers={"X-Webhook-Secret": SECRET}, timeout=30)
    assert r.status_code == 202 and r.json()["state"] == "accepted", r.text
    merge_ids = [i for i in r.json()["scan_ids"]
                 if admin.get(f"/v1/merges/{i}").status_code == 200]
    assert len(merge_ids) == 1, r.json()  # the scan's watch queued a scan beside it
    assert admin.get(f"/v1/watches/{watch['id']}").json()["last_merge"] == merge_ids[0]
    page.reload()
    link = row.locator('[data-field="last-merge"] a')
    expect(link).to_have_text(merge_ids[0][:8])
    shoot(page, "watches")
    link.click()
    expect(page).to_have_url(re.compile(rf"/ui/merges/{merge_ids[0]}$"))
    expect(page.locator("main")).to_contain_text(f"{model}@{new}")
    for w in (watch, scans):
        assert admin.delete(f"/v1/watches/{w['id']}").status_code == 204


def test_phone_width_nothing_overflows(browser: Browser, stack: Stack, admin: httpx.Client,
                                       zoo: Zoo) -> None:
    model, base = f"zoo/{CLEAN}", f"zoo/{zoo.model(CLEAN)['base']}"
    watch = admin.post("/v1/watches", json={"merge": {
        "merge_method": "task_arithmetic", "base_model": base,
        "models": [{"model": model}, {"model": f"{model}@{'1' * 40}"}]}}).json()
    try:
        with signed_in(browser, stack, PHONE) as page:
            page.goto("/ui/watches")
            expect(page.locator(f'tr[data-watch="{watch["id"]}"]')).to_be_visible()
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], width
    finally:
        admin.delete(f"/v1/watches/{watch['id']}")
