"""SARIF 2.1.0 export, so scan results land in code-scanning UIs (GitHub, GitLab, Azure DevOps).

One run, one result per finding. A rule's ``security-severity`` (which GitHub uses to rank alerts)
is the highest severity that rule reached in this report, or its default when it has no finding.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

from mergeshield.report.schema import Finding, ModelInput, ScanReport, Severity
from mergeshield.report.verdict import RULES, Rule

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"
INFORMATION_URI = "https://mergeshield.dev"
METHOD_URI = "https://arxiv.org/abs/2510.08016"  # Backdoor Vectors / IBVS
FINGERPRINT_KEY = "mergeshield/v1"

SECURITY_SEVERITY: dict[Severity, str] = {
    Severity.CRITICAL: "9.5",
    Severity.HIGH: "8.0",
    Severity.MEDIUM: "5.5",
    Severity.LOW: "3.0",
}
LEVEL: dict[Severity, str] = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _uri(text: str) -> str:
    """A relative URI reference for a path or repo id (attacker-chosen: percent-encode it)."""
    return quote(text.lstrip("/"), safe="/-._~@")


def _weight_files(model: ModelInput) -> list[str]:
    return [f.path for f in model.files if f.path.endswith(_WEIGHT_SUFFIXES)]


def suspect_fingerprint(model: ModelInput) -> str:
    """What identifies the suspect's weights: their sha256s, else the revision, else the source."""
    shas = sorted(f.sha256 for f in model.files if f.path.endswith(_WEIGHT_SUFFIXES))
    return ",".join(shas) or model.revision or model.source


def _rule_descriptor(rule: Rule, severity: Severity) -> dict[str, Any]:
    return {
        "id": rule.id,
        "name": rule.name,
        "shortDescription": {"text": rule.title},
        "fullDescription": {"text": rule.description},
        "help": {"text": rule.help, "markdown": f"**{rule.title}.** {rule.help}"},
        "helpUri": METHOD_URI,
        "defaultConfiguration": {"level": LEVEL[severity]},
        "properties": {
            "security-severity": SECURITY_SEVERITY[severity],
            "precision": "high",
            "tags": ["security", "machine-learning", "backdoor"],
        },
    }


def _rules(findings: list[Finding]) -> list[dict[str, Any]]:
    out = []
    for rule in RULES.values():
        seen = [f.severity for f in findings if f.id == rule.id]
        severity = max(seen, key=lambda s: s.rank) if seen else rule.default_severity
        out.append(_rule_descriptor(rule, severity))
    return out


def _location(report: ScanReport) -> dict[str, Any]:
    weights = _weight_files(report.suspect)
    if weights:
        artifact: dict[str, Any] = {"uri": _uri(weights[0]), "index": 0}
    else:
        artifact = {"uri": _uri(report.suspect.source)}
    return {
        "physicalLocation": {"artifactLocation": artifact},
        "logicalLocations": [{"name": report.suspect.source, "kind": "module"}],
    }


def _artifacts(report: ScanReport) -> list[dict[str, Any]]:
    by_path = {f.path: f for f in report.suspect.files}
    return [
        {
            "location": {"uri": _uri(path)},
            "length": by_path[path].size,
            "hashes": {"sha-256": by_path[path].sha256},
            "roles": ["analysisTarget"],
        }
        for path in _weight_files(report.suspect)
    ]


def _result(report: ScanReport, finding: Finding, rule_index: dict[str, int]) -> dict[str, Any]:
    key = "|".join([finding.id, finding.trigger_id or "", suspect_fingerprint(report.suspect)])
    result: dict[str, Any] = {
        "ruleId": finding.id,
        "level": LEVEL[finding.severity],
        "message": {"text": f"{finding.title}: {finding.message}"},
        "locations": [_location(report)],
        "partialFingerprints": {FINGERPRINT_KEY: hashlib.sha256(key.encode()).hexdigest()},
        "properties": {
            "severity": finding.severity.value,
            "security-severity": SECURITY_SEVERITY[finding.severity],
            "triggerId": finding.trigger_id,
            "evidence": finding.evidence,
        },
    }
    if finding.id in rule_index:
        result["ruleIndex"] = rule_index[finding.id]
    return result


def to_sarif(report: ScanReport) -> dict[str, Any]:
    """The report as a SARIF 2.1.0 log (a JSON-ready dict)."""
    rules = _rules(report.findings)
    rule_index = {r["id"]: i for i, r in enumerate(rules)}
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "MergeShield",
                "version": report.scanner_version,
                "informationUri": INFORMATION_URI,
                "rules": rules,
            }
        },
        "automationDetails": {"id": f"mergeshield/{report.scan_id}"},
        "invocations": [
            {
                "executionSuccessful": not report.incomplete,
                "toolExecutionNotifications": [
                    {
                        "level": "error",
                        "message": {"text": reason.message},
                        "descriptor": {"id": reason.code},
                    }
                    for reason in report.incomplete
                ],
            }
        ],
        "artifacts": _artifacts(report),
        "results": [_result(report, f, rule_index) for f in report.findings],
        "properties": {
            "scanId": report.scan_id,
            "verdict": report.verdict.status,
            "verdictSeverity": report.verdict.severity.value if report.verdict.severity else None,
            "verdictReasons": report.verdict.reasons,
            "schemaVersion": report.schema_version,
            "configHash": report.config_hash,
            "suspect": report.suspect.source,
            "suspectRevision": report.suspect.revision,
            "base": report.base.source,
            "baseRevision": report.base.revision,
        },
    }
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}
