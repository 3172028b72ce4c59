"""The self-contained HTML page: escaped, offline, well-formed, with its charts and images."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from mergeshield.report import ScanReport, to_html
from tests.support.reports import HOSTILE, sample_report

VOID = {"meta", "img", "br", "hr", "link", "input", "circle", "line", "rect", "polyline", "path"}


class Checker(HTMLParser):
    """Collects tags and attributes and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Checker:
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == []
    assert checker.stack == []
    return checker


REPORTS = {
    "bad": sample_report(),
    "clean": sample_report(backdoored=False),
    "incomplete": sample_report(backdoored=False, incomplete=True),
}


@pytest.mark.parametrize("report", REPORTS.values(), ids=REPORTS.keys())
def test_well_formed_and_accessible(report: ScanReport) -> None:
    page = to_html(report)
    checker = parse(page)
    tags = [t for t, _ in checker.tags]
    assert page.startswith("<!DOCTYPE html>")
    assert ("html", {"lang": "en"}) in checker.tags
    assert "title" in tags and "h1" in tags and "h2" in tags
    assert 'name="viewport"' in page
    for tag, attrs in checker.tags:
        if tag == "img":
            assert attrs.get("alt")
        if tag == "svg":
            assert attrs.get("role") == "img" and attrs.get("aria-label")


@pytest.mark.parametrize("report", REPORTS.values(), ids=REPORTS.keys())
def test_hostile_strings_are_escaped(report: ScanReport) -> None:
    page = to_html(report)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # the hostile text still reads correctly once parsed
    assert any(HOSTILE in chunk for chunk in parse(page).text)


def test_attribute_injection_is_escaped() -> None:
    report = sample_report()
    trigger = report.metrics.triggers[0].model_copy(update={"id": '"><img src=x onerror=alert(1)>'})
    bad = report.model_copy(
        update={"metrics": report.metrics.model_copy(update={"triggers": [trigger]})}
    )
    page = to_html(bad)
    checker = parse(page)
    assert not any("onerror" in attrs for _, attrs in checker.tags)
    assert all((attrs.get("src") or "data:").startswith("data:") for _, attrs in checker.tags)


@pytest.mark.parametrize("report", REPORTS.values(), ids=REPORTS.keys())
def test_nothing_is_loaded_from_elsewhere(report: ScanReport) -> None:
    page = to_html(report)
    checker = parse(page)
    for _, attrs in checker.tags:
        for name in ("src", "href", "xlink:href", "action", "poster"):
            value = attrs.get(name)
            assert value is None or value.startswith("data:image/png;base64,"), (name, value)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.I)
    assert "@import" not in page and "url(" not in page
    assert "default-src 'none'" in page  # the CSP forbids loads even if something slipped in


def test_backdoored_page_content() -> None:
    report = sample_report()
    page = to_html(report)
    assert page.index("Verdict: Backdoor suspected (CRITICAL)") < page.index("Triggers")
    assert 'class="verdict sev-CRITICAL"' in page
    verdict = page[page.index('<section class="verdict') : page.index("</section>")]
    assert '<span class="badge sev-CRITICAL">CRITICAL</span> <code>MS001</code>' in verdict
    assert '<span class="badge sev-HIGH">HIGH</span> <code>MS002</code>' in verdict
    assert verdict.count("sends 961/1000 non-target images") == 1  # not repeated as a reason
    assert "961/1000 (96.1%, 95% CI 94.7–97.1%)" in page
    assert "24/1000 (2.4%" in page  # ASR after
    assert "9612/10000 (96.1%" in page  # clean accuracy before
    n_triggers = len(report.metrics.triggers)
    assert page.count('src="data:image/png;base64,') == n_triggers
    assert page.count("image-rendering:pixelated") == 1  # in the stylesheet
    assert page.count("<svg ") == 3  # λ sweep, per-layer norms, per-tensor norms
    assert "Lambda sweep" in page and "λ = 0.75 (chosen)" in page
    assert page.count("<polyline") == 1 + n_triggers  # clean accuracy + one per trigger
    assert page.count('<rect x="290"') == 20 + 5  # one bar per tensor stat and per layer
    layers = page[page.index("Task-vector norm per layer") : page.index("<h2>Task vector</h2>")]
    assert [f"vit.encoder.layer.{i}" in layers for i in range(5)] == [True] * 5
    for f in report.suspect.files + report.base.files:
        assert f.sha256 in page
    assert report.config_hash in page and report.device in page
    assert "google/vit-base-patch16-224-in21k" in page
    assert "Incomplete" not in page


def test_bars_are_sorted_and_capped_at_40() -> None:
    report = sample_report()
    assert report.task_vector is not None
    stats = [
        s.model_copy(update={"name": f"t{i}.{s.name}", "relative_norm": s.relative_norm + i})
        for i in range(3)
        for s in report.task_vector.per_tensor
    ]
    tv = report.task_vector.model_copy(update={"per_tensor": stats, "per_layer": []})
    page = to_html(report.model_copy(update={"task_vector": tv}))
    assert page.count('<rect x="290"') == 40
    widths = [float(w) for w in re.findall(r'<rect x="290" y="[\d.]+" width="([\d.]+)"', page)]
    assert widths == sorted(widths, reverse=True)


def test_incomplete_page() -> None:
    page = to_html(sample_report(backdoored=False, incomplete=True))
    assert "Verdict: Inconclusive" in page
    assert "<h2>Incomplete</h2>" in page and "out of GPU memory" in page
    assert "λ sweep" not in page  # no sweep was run
    assert page.count("<svg ") == 2  # the norms per layer and per tensor


def test_invalid_preview_is_dropped() -> None:
    report = sample_report()
    trigger = report.metrics.triggers[0].model_copy(update={"preview_png": '" onload="x'})
    bad = report.model_copy(
        update={"metrics": report.metrics.model_copy(update={"triggers": [trigger]})}
    )
    assert "data:image/png" not in to_html(bad)
