"""Scan reports: the versioned schema, the verdict rule, and JSON / SARIF / HTML / text output."""

from mergeshield.report.html import to_html
from mergeshield.report.io import export_schema, load_report, write_report
from mergeshield.report.sarif import to_sarif
from mergeshield.report.schema import (
    SCHEMA_VERSION,
    DatasetInput,
    FileDigest,
    Finding,
    IncompleteReason,
    InjectionSummary,
    LambdaPoint,
    LayerStat,
    Metrics,
    ModelInput,
    OutputSummary,
    RateModel,
    ScanReport,
    Severity,
    SkippedTensor,
    SweepSummary,
    TaskVectorSummary,
    TensorStat,
    TriggerMeasurement,
    Verdict,
    json_schema,
)
from mergeshield.report.text import to_text
from mergeshield.report.verdict import MIN_ASR_GAP, RULES, decide, exit_code

__all__ = [
    "MIN_ASR_GAP",
    "RULES",
    "SCHEMA_VERSION",
    "DatasetInput",
    "FileDigest",
    "Finding",
    "IncompleteReason",
    "InjectionSummary",
    "LambdaPoint",
    "LayerStat",
    "Metrics",
    "ModelInput",
    "OutputSummary",
    "RateModel",
    "ScanReport",
    "Severity",
    "SkippedTensor",
    "SweepSummary",
    "TaskVectorSummary",
    "TensorStat",
    "TriggerMeasurement",
    "Verdict",
    "decide",
    "exit_code",
    "export_schema",
    "json_schema",
    "load_report",
    "to_html",
    "to_sarif",
    "to_text",
    "write_report",
]
