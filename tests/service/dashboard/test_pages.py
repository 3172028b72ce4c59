"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, against the real
``mergeshield serve --auth`` (API + worker) with the quick zoo's models on a loopback hub.

One stack and one browser for the module. The flow: sign in, upload the backdoored ViT and its
base from the form, watch the scan finish in the list (updated live, no reload), open its report,
download the cleaned checkpoint; then the BV cache and webhook pages, a keyboard-only run and a
phone-width check. Screenshots of every page go to docs/screenshots/ from the same run.
"""

from __future__ import annotations

import json
import re
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect
from safetensors import safe_open

from tests.service.conftest import CLEAN, SUSPECT, Published, zipped
from tests.support.browser import DESKTOP, PHONE, context, shoot, sign_in
from tests.support.stack import ADMIN_KEY, Stack
from tests.support.zoo import Zoo

SECRET = "hub-webhook-secret-for-the-dashboard-test"


class _Receiver(BaseHTTPRequestHandler):
    """A callback receiver that accepts everything (signatures are the webhook tests' job)."""

    received: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.received.append(self.rfile.read(int(self.headers.get("content-length", 0))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def stack(published: Published, bv_cache_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("dashboard"), "sqlite-filesystem",
               env=published.env(bv_cache_dir, MERGESHIELD_WEBHOOK_SECRET=SECRET,
                                  MERGESHIELD_CALLBACK_ALLOW_PRIVATE="true")) as s:
        yield s.serve()


@pytest.fixture(scope="module")
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A desktop browser signed in with the admin key (the BV cache page needs it)."""
    ctx = context(browser, stack, DESKTOP)
    pg = ctx.new_page()
    pg.goto("/ui/signin")
    shoot(pg, "signin")
    sign_in(pg)
    try:
        yield pg
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def finished(page: Page, zoo: Zoo, published: Published, receiver: str,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A scan started from the form (both models uploaded through it), followed in the list
    until it finished; what the list showed on the way is returned with the scan's id."""
    folder = tmp_path_factory.mktemp("models")
    page.goto("/ui/scans/new")
    for role, name in (("suspect", SUSPECT), ("base", zoo.model(SUSPECT)["base"])):
        archive = folder / f"{name}.zip"
        archive.write_bytes(zipped(zoo.path(name)))
        page.locator(f"#{role}-file").set_input_files(archive)
        expect(page.locator(f'[data-upload="{role}"]')).to_have_attribute(
            "data-uploaded", re.compile(r"^[0-9a-f]{32}$"))
        expect(page.locator(f'[data-upload="{role}"] [data-upload-status]')).to_contain_text(
            f"Uploaded {name}.zip")
    page.get_by_label("Dataset", exact=True).fill(published.dataset)
    page.get_by_label("Test images evaluated").fill("500")
    page.get_by_label("Invert triggers (slower)").uncheck()
    page.get_by_label("Callback URL").fill(receiver)
    shoot(page, "new-scan", full_page=True)
    page.get_by_role("button", name="Start scan").click()
    expect(page).to_have_url(re.compile(r"/ui/scans/[0-9a-f]{32}$"))
    scan_id = page.url.rsplit("/", 1)[1]
    expect(page.get_by_role("button", name="Cancel scan")).to_be_visible()
    shoot(page, "scan-running")

    page.goto("/ui/")
    row = page.locator(f'tr[data-scan="{scan_id}"]')
    seen: list[tuple[str, float]] = []  # (state, percent) as the page showed them, unreloaded
    live_shot = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = row.get_attribute("data-state") or ""
        pct = float(row.locator('[data-field="progress"]').get_attribute("value") or 0)
        if not seen or seen[-1] != (state, pct):
            seen.append((state, pct))
        if state in ("succeeded", "failed", "cancelled"):
            break
        if 20 < pct < 90 and not live_shot:
            shoot(page, "scans-live")
            live_shot = True
        time.sleep(0.4)
    shoot(page, "scans")
    return {"id": scan_id, "seen": seen}


def test_the_list_follows_the_scan_live_until_it_succeeds(finished: dict[str, Any],
                                                          page: Page) -> None:
    seen = finished["seen"]
    assert seen[-1] == ("succeeded", 100.0), seen
    assert len({pct for _state, pct in seen}) >= 3, seen  # updated while it ran, not reloaded
    row = page.locator(f'tr[data-scan="{finished["id"]}"]')
    expect(row.locator('[data-field="verdict"]')).to_contain_text("backdoor suspected")
    expect(row).to_contain_text(f"{SUSPECT}.zip")  # an upload is shown by its file's name


def test_the_report_page_shows_verdict_metrics_curve_layers_triggers_provenance(
        finished: dict[str, Any], page: Page) -> None:
    page.goto("/ui/")
    page.get_by_role("link", name=finished["id"][:8]).click()
    verdict = page.locator("section.verdict")
    expect(verdict.get_by_role("heading")).to_contain_text("Backdoor suspected")
    headings = page.locator("main h2").all_inner_texts()
    assert headings.index(verdict.get_by_role("heading").inner_text()) == 0  # verdict first
    for title in ("Clean accuracy", "Triggers (attack success rate)", "λ sweep (IBVS)",
                  "Task-vector norm per layer", "Provenance"):
        assert title in headings, headings
    expect(page.get_by_role("img", name=re.compile("^Lambda sweep"))).to_be_visible()
    layers = page.get_by_role("img", name=re.compile("of each of the .* layers"))
    expect(layers).to_contain_text("vit.encoder.layer.0")
    assert page.locator("img.preview").count() >= 3  # triggers stamped on a sample input
    expect(page.get_by_text("95% CI").first).to_be_visible()
    expect(page.get_by_role("heading", name="Files (sha256)")).to_be_visible()
    shoot(page, "scan-report")
    for heading, name in (("Triggers (attack success rate)", "scan-report-triggers"),
                          ("λ sweep (IBVS)", "scan-report-sweep"),
                          ("Task-vector norm per layer", "scan-report-layers")):
        page.get_by_role("heading", name=heading).evaluate("el => el.scrollIntoView()")
        shoot(page, name)


def test_downloads_are_the_cleaned_checkpoint_and_the_reports(
        finished: dict[str, Any], page: Page, tmp_path: Path) -> None:
    page.goto(f"/ui/scans/{finished['id']}")
    with page.expect_download() as got:
        page.get_by_role("link", name="Cleaned checkpoint (zip)").click()
    with zipfile.ZipFile(got.value.path()) as zf:
        assert zf.testzip() is None
        zf.extractall(tmp_path / "zip")
    assert {"model.safetensors", "config.json"} <= {p.name for p in (tmp_path / "zip").iterdir()}
    with safe_open(tmp_path / "zip" / "model.safetensors", "pt") as st:
        meta = st.metadata()
        assert any(k.startswith("vit.encoder.layer.") for k in st.keys())  # noqa: SIM118
    assert meta["mergeshield.scan_id"] == finished["id"]
    with page.expect_download() as got:
        page.get_by_role("link", name="Report (JSON)").click()
    assert json.loads(Path(got.value.path()).read_text())["scan_id"] == finished["id"]
    with page.expect_download() as got:
        page.get_by_role("link", name="Report (SARIF)").click()
    assert json.loads(Path(got.value.path()).read_text())["version"] == "2.1.0"


def test_layers_endpoint_serves_what_the_page_draws(finished: dict[str, Any],
                                                   stack: Stack) -> None:
    with stack.client() as c:
        layers = c.get(f"/v1/scans/{finished['id']}/layers").json()
    names = [x["name"] for x in layers]
    assert names[:2] == ["vit.embeddings", "vit.encoder.layer.0"] and "vit.layernorm" in names
    assert all(x["norm"] > 0 and x["n_tensors"] > 0 for x in layers)


def test_bv_cache_page_shows_recipe_and_own_asr(finished: dict[str, Any], page: Page,
                                               stack: Stack) -> None:
    page.goto("/ui/bv-cache")
    card = page.locator("section.card").filter(has_text="vit-base").first
    expect(card.get_by_role("heading", level=2)).to_contain_text("ready")
    card.get_by_text("Recipe", exact=True).click()
    expect(card.get_by_text("per_class", exact=True)).to_be_visible()
    expect(card.get_by_role("heading", name=re.compile("Own ASR"))).to_be_visible()
    assert card.locator("tbody tr").count() == 10  # one injected trigger per MNIST class
    shoot(page, "bv-cache")
    with stack.client() as c:
        entries = c.get("/v1/bv-cache").json()
    # named by the scan that built it first: the hub id, or an upload's label when another
    # module's upload scan got there first (the card above is found the same way)
    assert any("vit-base" in e["base"] and len(e["own_asr"]) == 10 for e in entries)


def test_webhook_deliveries_both_ways_with_redeliver(finished: dict[str, Any], page: Page,
                                                    stack: Stack) -> None:
    event = {"event": {"action": "update", "scope": "repo.content"},
             "repo": {"type": "model", "name": "someone/unwatched", "id": "1",
                      "headSha": "a" * 40},
             "updatedRefs": [{"ref": "refs/heads/main", "oldSha": "b" * 40, "newSha": "a" * 40}],
             "webhook": {"id": "w1", "version": 3}}
    hub = httpx.post(f"{stack.url}/v1/webhooks/huggingface", json=event,
                     headers={"X-Webhook-Secret": SECRET}, timeout=10)
    assert hub.status_code == 200, hub.text  # recorded and ignored: nothing watches the repo
    page.goto("/ui/webhooks?direction=outbound")
    out = page.locator("tr[data-delivery]").filter(has_text="/hook")
    for _ in range(40):  # the API sends callbacks from a background loop
        if "delivered" in out.inner_text():
            break
        time.sleep(0.5)
        page.reload()
    expect(out.locator(".state")).to_have_text("delivered")
    page.goto("/ui/webhooks")
    inbound = page.locator("tr[data-delivery]").filter(has_text="someone/unwatched")
    expect(inbound.locator(".state")).to_have_text("ignored")
    shoot(page, "webhooks")
    out = page.locator("tr[data-delivery]").filter(has_text="/hook")
    out.get_by_role("button", name="Redeliver").click()
    expect(page.get_by_role("status")).to_have_text("Delivery queued again.")
    with stack.client() as c:
        outbound = c.get("/v1/webhooks/deliveries", params={"direction": "outbound"}).json()
    assert outbound["items"][0]["scan_id"] == finished["id"]


def test_a_file_dropped_on_the_page_is_uploaded_and_a_refusal_is_shown(page: Page) -> None:
    page.goto("/ui/scans/new")
    zone = page.locator('[data-upload="base"] [data-drop]')
    dropped = page.evaluate_handle("""() => {
        const dt = new DataTransfer();
        dt.items.add(new File(["not a model"], "notes.txt", {type: "text/plain"}));
        return dt; }""")
    zone.dispatch_event("dragover", {"dataTransfer": dropped})
    expect(zone).to_have_class(re.compile(r"\bover\b"))
    zone.dispatch_event("drop", {"dataTransfer": dropped})
    status = page.locator('[data-upload="base"] [data-upload-status]')
    expect(status).to_contain_text("Upload failed: notes.txt: upload a .safetensors")
    assert page.locator('[name="base_upload"]').input_value() == ""  # nothing to scan


def _tab_to(page: Page, check: str, limit: int = 80) -> None:
    """Press Tab until ``check`` (JS on ``el``) holds for the focused element; every stop must
    show a focus outline."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        style = page.evaluate("() => { const s = getComputedStyle(document.activeElement);"
                              " return [s.outlineStyle, s.outlineWidth]; }")
        tag = page.evaluate("() => document.activeElement.outerHTML.slice(0, 80)")
        assert style[0] != "none" and style[1] != "0px", (tag, style)
        if page.evaluate(f"(el) => {check}", page.evaluate_handle("document.activeElement")):
            return
    raise AssertionError(f"no element with {check} reached by Tab")


def test_keyboard_only_sign_in_start_and_cancel(browser: Browser, stack: Stack,
                                                published: Published,
                                                finished: dict[str, Any]) -> None:
    ctx = context(browser, stack, DESKTOP)
    page = ctx.new_page()
    try:
        page.goto("/ui/signin")
        _tab_to(page, "el.classList.contains('skip')")  # the first stop skips the navigation
        _tab_to(page, "el.id === 'key'")
        page.keyboard.type(ADMIN_KEY)
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Scans")).to_be_visible()
        _tab_to(page, "el.textContent === 'New scan'")
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="New scan")).to_be_visible()
        for name, text in (("suspect_hub", f"zoo/{CLEAN}"), ("base_hub", "zoo/vit-base"),
                           ("evaluation", published.dataset)):
            _tab_to(page, f"el.name === '{name}'")
            page.keyboard.type(text)
        _tab_to(page, "el.textContent === 'Start scan'")
        page.keyboard.press("Enter")
        expect(page.get_by_role("button", name="Cancel scan")).to_be_visible()
        _tab_to(page, "el.textContent === 'Cancel scan'")
        page.keyboard.press("Enter")
        expect(page.get_by_role("status")).to_have_text("The scan was cancelled.")
        expect(page.locator(".scan-head .state")).to_have_text("cancelled")
        expect(page.get_by_role("button", name="Rescan")).to_be_visible()
    finally:
        ctx.close()


def test_phone_width_nothing_overflows(browser: Browser, stack: Stack,
                                       finished: dict[str, Any]) -> None:
    ctx = context(browser, stack, PHONE)
    page = ctx.new_page()
    try:
        page.goto("/ui/signin")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        sign_in(page)
        for url, shot in (("/ui/", "phone-scans"), ("/ui/scans/new", None),
                          (f"/ui/scans/{finished['id']}", "phone-scan-report"),
                          ("/ui/bv-cache", None), ("/ui/webhooks", None)):
            page.goto(url)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], (url, width)
            if shot:
                shoot(page, shot)
    finally:
        ctx.close()


def test_cookie_requests_from_another_site_are_refused(stack: Stack,
                                                       finished: dict[str, Any]) -> None:
    with httpx.Client(base_url=stack.url, cookies={"mergeshield_key": ADMIN_KEY},
                      timeout=10) as c:
        before = c.get("/v1/scans").json()["total"]  # reading with the cookie is fine
        forged = c.post(f"/v1/scans/{finished['id']}/rescan",
                        headers={"Origin": "https://evil.example"})
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "forbidden"
        assert c.post("/ui/signout").status_code == 403  # neither Origin nor Referer
        assert c.get("/v1/scans").json()["total"] == before  # nothing forged got in
        same_site = c.post(f"/v1/scans/{finished['id']}/rescan", headers={"Origin": stack.url})
        assert same_site.status_code == 202
        assert c.delete(f"/v1/scans/{same_site.json()['id']}",
                        headers={"Origin": stack.url}).json()["state"] == "cancelled"
