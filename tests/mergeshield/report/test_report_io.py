"""JSON round trip, the committed JSON Schema, and writing every format atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest

from mergeshield.errors import ConfigError, InputError, SourceNotFoundError
from mergeshield.report import ScanReport, export_schema, json_schema, load_report, write_report
from mergeshield.report.io import SCHEMA_PATH, schema_text
from tests.support.reports import sample_report

ALL = [
    sample_report(),
    sample_report(backdoored=False),
    sample_report(incomplete=True),
    sample_report(backdoored=False, incomplete=True),
]


def test_committed_schema_is_the_generated_one() -> None:
    committed = SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == schema_text(), (
        "mergeshield/schemas/report.schema.json is stale: run "
        "`python -m mergeshield.report.schema_export` and commit the result"
    )
    assert json.loads(committed) == json_schema()


def test_export_schema_writes_the_same_text(tmp_path: Path) -> None:
    out = export_schema(tmp_path / "schemas" / "report.schema.json")
    assert out.read_text(encoding="utf-8") == schema_text()


@pytest.mark.parametrize("report", ALL, ids=["bad", "clean", "bad-incomplete", "incomplete"])
def test_sample_reports_validate_against_the_committed_schema(report: ScanReport) -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(report.model_dump(mode="json"))


def test_schema_rejects_a_report_without_a_verdict() -> None:
    doc = sample_report().model_dump(mode="json")
    del doc["verdict"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


@pytest.mark.parametrize("report", ALL, ids=["bad", "clean", "bad-incomplete", "incomplete"])
def test_json_round_trip(tmp_path: Path, report: ScanReport) -> None:
    paths = write_report(report, tmp_path)
    assert paths == {"json": tmp_path / "report.json"}
    assert load_report(paths["json"]) == report
    text = paths["json"].read_text(encoding="utf-8")
    assert text.startswith('{\n  "schema_version"')  # indent 2


def test_write_every_format(tmp_path: Path) -> None:
    paths = write_report(sample_report(), tmp_path / "out", ["html", "sarif", "text", "html"])
    assert list(paths) == ["json", "html", "sarif", "text"]
    assert {p.name for p in paths.values()} == {
        "report.json",
        "report.html",
        "report.sarif",
        "report.txt",
    }
    assert json.loads(paths["sarif"].read_text(encoding="utf-8"))["version"] == "2.1.0"
    assert paths["html"].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "BACKDOOR SUSPECTED" in paths["text"].read_text(encoding="utf-8")
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_files_are_readable_like_a_plain_open(tmp_path: Path) -> None:
    path = write_report(sample_report(), tmp_path)["json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_rewrite_replaces_the_old_report(tmp_path: Path) -> None:
    write_report(sample_report(), tmp_path)
    clean = sample_report(backdoored=False)
    write_report(clean, tmp_path)
    assert load_report(tmp_path / "report.json") == clean


def test_unknown_format_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'pdf'"):
        write_report(sample_report(), tmp_path, ["html", "pdf"])
    assert list(tmp_path.iterdir()) == []


def test_load_missing_report(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError):
        load_report(tmp_path / "nope.json")


def test_load_invalid_report(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    doc = sample_report().model_dump(mode="json")
    doc["verdict"]["status"] = "probably fine"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(InputError, match="not a valid MergeShield scan report") as info:
        load_report(path)
    assert info.value.details


def test_load_not_json(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("<html>", encoding="utf-8")
    with pytest.raises(InputError):
        load_report(path)


def _strict(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"bare {name} in a report")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null_never_a_bare_nan(tmp_path: Path) -> None:
    report = sample_report().model_copy(update={"timings": {"resolve": float("nan"),
                                                            "sweep": float("inf"), "ok": 1.5}})
    written = write_report(report, tmp_path, ("json", "sarif"))
    data = _strict(written["json"].read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert data["timings"] == {"resolve": None, "sweep": None, "ok": 1.5}
    _strict(written["sarif"].read_text(encoding="utf-8"))  # strict JSON as well
