"""The merge pages in a real browser (issue 17): a plan pasted in the New merge form runs on the
real ``mergeshield serve --auth`` and its page shows, per task, the fine-tune alone, the
undefended merge, the defended one and the merge without the flagged model, and the found
trigger's ASR at each; a bad plan comes back with its code; a running merge is cancelled from its
page; nothing overflows a phone's width."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import Browser, Page, expect
from safetensors import safe_open

from tests.service.conftest import SUSPECT, Published
from tests.support.browser import PHONE, shoot, signed_in
from tests.support.stack import Stack
from tests.support.zoo import Zoo

MODEL = "vit-digits-clean"
# issue 17's plan: the three task fine-tunes of the ViT family, the MNIST one backdoored
THREE = (SUSPECT, MODEL, "vit-mnist-rot90-clean")


@pytest.fixture(scope="module")
def stack(published: Published, bv_cache_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("merge-pages"), "sqlite-filesystem",
               env=published.env(bv_cache_dir)) as s:
        yield s.serve()


def plan_text(zoo: Zoo, published: Published, models: tuple[str, ...] = (MODEL,),
              **scan: object) -> str:
    """The zoo's ``models`` (by default one clean fine-tune of the digits task) merged onto
    their base, all on the hub with their tasks' data."""
    base = zoo.model(MODEL)["base"]
    data = {}
    for name in models:
        published.hub.add_repo(f"zoo/{name}", zoo.path(name))
        data[f"zoo/{name}"] = f"zoo/{zoo.model(name)['task']}"
        published.hub.add_repo(data[f"zoo/{name}"], zoo.dataset(name), repo_type="dataset")
    return yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": f"zoo/{base}",
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in data],
        "mergeshield": {"evaluation": data,
                        "scan": {"inversion": False, "max_eval": 200, **scan}}})


def _submit(page: Page, plan: str, shot: str | None = None) -> None:
    page.goto("/ui/merges/new")
    page.get_by_label("Plan (mergekit YAML, or the same as JSON)").fill(plan)
    if shot:
        shoot(page, shot)
    page.get_by_role("button", name="Start merge").click()


def test_a_pasted_plan_runs_and_its_page_shows_each_tasks_accuracy(
        page: Page, zoo: Zoo, published: Published, tmp_path: Path) -> None:
    _submit(page, plan_text(zoo, published, THREE), shot="new-merge")
    expect(page).to_have_url(re.compile(r"/ui/merges/[0-9a-f]{32}$"))
    merge_id = page.url.rsplit("/", 1)[1]
    # the page follows the merge and reloads with its results when it has finished
    expect(page.get_by_role("heading", name="Accuracy per task")).to_be_visible(timeout=360_000)
    rows = page.locator("table.tasks tbody tr")
    expect(rows).to_have_count(3)
    bad = rows.filter(has_text=f"zoo/{SUSPECT}")
    expect(bad).to_contain_text("backdoor suspected")
    expect(bad.locator("td").nth(1)).to_have_text("cleaned")
    for i in range(3):  # alone, undefended merge, defended merge, merge without flagged models
        cells = rows.nth(i).locator("td").all_inner_texts()[-4:]
        assert all(re.match(r"^\d+\.\d %", c) for c in cells), cells
    expect(page.locator('[data-field="gamma"]')).to_have_text(re.compile(r"^(1|0\.\d+)$"))
    found = page.locator("table.triggers tbody tr")
    expect(found.first).to_contain_text(f"zoo/{SUSPECT}")
    for i in range(found.count()):  # the found trigger at every point
        cells = found.nth(i).locator("td").all_inner_texts()[-4:]
        assert all(re.match(r"^\d+\.\d %", c) for c in cells), cells
    shoot(page, "merge-report", full_page=True)
    with page.expect_download() as got:
        page.get_by_role("link", name="Merged model (zip)").click()
    with zipfile.ZipFile(got.value.path()) as zf:
        zf.extractall(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata()["mergeshield.policy"] == "clean"
    page.goto("/ui/merges")
    expect(page.locator(f'tr[data-scan="{merge_id}"] .state')).to_have_text("succeeded")
    shoot(page, "merges")


def test_one_clean_model_merged_onto_its_base_is_that_model(page: Page, zoo: Zoo,
                                                             published: Published) -> None:
    _submit(page, plan_text(zoo, published))
    expect(page.get_by_role("heading", name="Accuracy per task")).to_be_visible(timeout=240_000)
    row = page.locator("table.tasks tbody tr")
    expect(row).to_have_count(1)
    *cells, without = row.locator("td").all_inner_texts()[-4:]
    assert all(re.match(r"^\d+\.\d %", c) for c in cells), cells
    assert len(set(cells)) == 1, cells  # the same accuracy alone, undefended and defended
    assert without == "—"  # nothing flagged: no merge without a flagged model to measure
    expect(page.locator('[data-field="gamma"]')).to_contain_text("no cleaned model")


def test_a_bad_plan_comes_back_with_its_code_and_text(page: Page) -> None:
    bad = "merge_method: slerp\nbase_model: org/base\nmodels: [{model: org/a}]\n"
    _submit(page, bad)
    expect(page.get_by_role("alert")).to_contain_text("invalid_config")
    expect(page.get_by_label("Plan (mergekit YAML, or the same as JSON)")).to_have_value(bad)


def test_a_running_merge_is_cancelled_from_its_page(page: Page, zoo: Zoo,
                                                    published: Published) -> None:
    # a trigger inversion of many minutes: only a cancel stops it
    _submit(page, plan_text(zoo, published, inversion=True, inversion_steps=10_000,
                            probes=False))
    expect(page.locator('.scan-head [data-field="stage"]')).to_contain_text(
        "invert_triggers", timeout=120_000)  # live progress, no reload
    page.get_by_role("button", name="Cancel merge").click()
    expect(page.get_by_role("status")).to_have_text("The merge was cancelled.")
    expect(page.locator(".scan-head .state")).to_have_text("cancelled")


def test_phone_width_nothing_overflows(browser: Browser, stack: Stack) -> None:
    with signed_in(browser, stack, PHONE) as page:
        page.goto("/ui/merges")
        merge = page.locator("tr[data-scan] a").first.get_attribute("href")
        for url in ("/ui/merges", "/ui/merges/new", merge):
            page.goto(str(url))
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], (url, width)
