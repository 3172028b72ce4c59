"""SARIF 2.1.0 export, checked against a hand-written subset of the official schema.

The subset keeps the official schema's property names (``additionalProperties: false``), required
keys and enums for every object this exporter writes, so a misspelt key fails here as it would fail
in a code-scanning upload.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from mergeshield.report import ScanReport, Severity, to_sarif
from mergeshield.report.sarif import SECURITY_SEVERITY
from tests.support.reports import HOSTILE, sample_report


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {**props, "properties": {"type": "object"}},
        "required": required or [],
    }


_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": -1}
_LEVEL = {"enum": ["none", "note", "warning", "error"]}
_MSG = _obj({"text": _STR, "markdown": _STR, "id": _STR}, ["text"])
_ARTIFACT_LOC = _obj({"uri": {"type": "string", "format": "uri-reference"}, "index": _INT})
_RULE = _obj(
    {
        "id": _STR,
        "name": _STR,
        "shortDescription": _MSG,
        "fullDescription": _MSG,
        "help": _MSG,
        "helpUri": {"type": "string", "format": "uri"},
        "defaultConfiguration": _obj({"level": _LEVEL, "enabled": {"type": "boolean"}}),
    },
    ["id"],
)
_LOCATION = _obj(
    {
        "physicalLocation": _obj({"artifactLocation": _ARTIFACT_LOC}),
        "logicalLocations": {"type": "array", "items": _obj({"name": _STR, "kind": _STR})},
    }
)
_RESULT = _obj(
    {
        "ruleId": _STR,
        "ruleIndex": _INT,
        "level": _LEVEL,
        "message": _MSG,
        "locations": {"type": "array", "items": _LOCATION},
        "partialFingerprints": {"type": "object", "additionalProperties": _STR},
    },
    ["message"],
)
_DRIVER = _obj(
    {
        "name": _STR,
        "version": _STR,
        "informationUri": {"type": "string", "format": "uri"},
        "rules": {"type": "array", "items": _RULE},
    },
    ["name"],
)
_NOTIFICATION = _obj(
    {"level": _LEVEL, "message": _MSG, "descriptor": _obj({"id": _STR})}, ["message"]
)
_INVOCATION = _obj(
    {
        "executionSuccessful": {"type": "boolean"},
        "toolExecutionNotifications": {"type": "array", "items": _NOTIFICATION},
    },
    ["executionSuccessful"],
)
_ARTIFACT = _obj(
    {
        "location": _ARTIFACT_LOC,
        "length": _INT,
        "hashes": {"type": "object", "additionalProperties": _STR},
        "roles": {"type": "array", "items": {"enum": ["analysisTarget", "attachment"]}},
    }
)
_RUN = _obj(
    {
        "tool": _obj({"driver": _DRIVER}, ["driver"]),
        "automationDetails": _obj({"id": _STR}),
        "invocations": {"type": "array", "items": _INVOCATION},
        "artifacts": {"type": "array", "items": _ARTIFACT},
        "results": {"type": "array", "items": _RESULT},
    },
    ["tool"],
)
SARIF_SUBSET: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    **_obj(
        {
            "$schema": {"type": "string", "format": "uri"},
            "version": {"enum": ["2.1.0"]},
            "runs": {"type": "array", "items": _RUN},
        },
        ["version", "runs"],
    ),
}

URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")  # RFC 3986
REPORTS = {
    "bad": sample_report(),
    "clean": sample_report(backdoored=False),
    "bad-incomplete": sample_report(incomplete=True),
    "incomplete": sample_report(backdoored=False, incomplete=True),
}


@pytest.mark.parametrize("report", REPORTS.values(), ids=REPORTS.keys())
def test_matches_the_sarif_subset_and_is_json(report: ScanReport) -> None:
    log = json.loads(json.dumps(to_sarif(report)))  # JSON-ready, nothing exotic
    jsonschema.Draft7Validator(
        SARIF_SUBSET, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    ).validate(log)
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    assert len(log["runs"]) == 1
    # jsonschema checks "uri-reference" only with extra packages: check the characters here
    run = log["runs"][0]
    uris = [a["location"]["uri"] for a in run["artifacts"]] + [
        loc["physicalLocation"]["artifactLocation"]["uri"]
        for r in run["results"]
        for loc in r["locations"]
    ]
    assert all(URI_CHARS.fullmatch(u) for u in uris), uris


def test_driver_and_rules() -> None:
    run = to_sarif(sample_report())["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "MergeShield"
    assert driver["version"] == "0.1.0"
    assert driver["informationUri"].startswith("https://")
    assert [r["id"] for r in driver["rules"]] == ["MS001", "MS002", "MS003"]
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"] and rule["fullDescription"]["text"]
        assert rule["help"]["text"]
        assert rule["properties"]["security-severity"] in SECURITY_SEVERITY.values()
        assert rule["defaultConfiguration"]["level"] in {"error", "warning", "note"}
    by_id = {r["id"]: r for r in driver["rules"]}
    assert by_id["MS001"]["properties"]["security-severity"] == "9.5"  # CRITICAL in this report
    assert by_id["MS002"]["properties"]["security-severity"] == "8.0"
    assert by_id["MS003"]["properties"]["security-severity"] == "8.0"  # default HIGH


def test_results_point_at_rules_and_the_weights() -> None:
    report = sample_report()
    run = to_sarif(report)["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert len(run["results"]) == len(report.findings) == 3
    levels = {Severity.CRITICAL: "error", Severity.HIGH: "error"}
    for result, finding in zip(run["results"], report.findings, strict=True):
        assert result["ruleId"] == finding.id == rules[result["ruleIndex"]]["id"]
        assert result["level"] == levels[finding.severity]
        assert finding.message in result["message"]["text"]
        uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert uri == "model.safetensors"
        assert run["artifacts"][0]["hashes"]["sha-256"] == report.suspect.files[1].sha256
    assert run["invocations"][0]["executionSuccessful"] is True
    assert run["invocations"][0]["toolExecutionNotifications"] == []
    assert run["properties"]["verdict"] == "backdoor_suspected"
    assert run["properties"]["scanId"] == report.scan_id


def test_levels_for_medium_and_low() -> None:
    report = sample_report()
    findings = [
        report.findings[0].model_copy(update={"severity": Severity.MEDIUM}),
        report.findings[1].model_copy(update={"severity": Severity.LOW}),
    ]
    results = to_sarif(report.model_copy(update={"findings": findings}))["runs"][0]["results"]
    assert [r["level"] for r in results] == ["warning", "note"]


def test_fingerprints_are_stable_and_distinct() -> None:
    a = to_sarif(sample_report())["runs"][0]["results"]
    b = to_sarif(sample_report().model_copy(update={"scan_id": "another"}))["runs"][0]["results"]
    prints = [r["partialFingerprints"]["mergeshield/v1"] for r in a]
    assert prints == [r["partialFingerprints"]["mergeshield/v1"] for r in b]
    assert len(set(prints)) == len(prints)
    report = sample_report()
    files = [f.model_copy(update={"sha256": "0" * 64}) for f in report.suspect.files]
    other = report.model_copy(
        update={"suspect": report.suspect.model_copy(update={"files": files})}
    )
    changed = to_sarif(other)["runs"][0]["results"]
    assert prints[0] != changed[0]["partialFingerprints"]["mergeshield/v1"]


def test_incomplete_scan_is_not_successful() -> None:
    run = to_sarif(sample_report(backdoored=False, incomplete=True))["runs"][0]
    invocation = run["invocations"][0]
    assert invocation["executionSuccessful"] is False
    [note] = invocation["toolExecutionNotifications"]
    assert note["descriptor"]["id"] == "sweep"
    assert "GPU memory" in note["message"]["text"]
    assert run["results"] == []
    assert run["properties"]["verdict"] == "inconclusive"


def test_source_without_weight_files_is_percent_encoded() -> None:
    report = sample_report()
    suspect = report.suspect.model_copy(update={"files": []})
    run = to_sarif(report.model_copy(update={"suspect": suspect}))["runs"][0]
    loc = run["results"][0]["locations"][0]
    uri = loc["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "evil-org/%3Cscript%3Ealert%281%29%3C/script%3E"
    assert loc["logicalLocations"][0]["name"] == f"evil-org/{HOSTILE}"
    assert run["artifacts"] == []
