"""Write and read scan reports, and publish the report's JSON Schema.

``python -m mergeshield.report.schema_export [PATH]`` regenerates the published schema,
``mergeshield/schemas/report.schema.json`` (a test checks that the committed file matches).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergeshield.errors import ConfigError, InputError, SourceNotFoundError, StorageFullError
from mergeshield.report.html import to_html
from mergeshield.report.sarif import to_sarif
from mergeshield.report.schema import ScanReport, json_schema
from mergeshield.report.text import to_text

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "report.schema.json"


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None, at any depth: JSON has no NaN,
    and a bare ``NaN`` makes a report unreadable to strict parsers (jq, browsers, Go, Rust)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always yields strict JSON: non-finite numbers become null."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)


def _json(report: ScanReport) -> str:
    return strict_json(report.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"


def _sarif(report: ScanReport) -> str:
    return strict_json(to_sarif(report), indent=2, ensure_ascii=False) + "\n"


# format name -> (file name, renderer)
FORMATS: dict[str, tuple[str, Callable[[ScanReport], str]]] = {
    "json": ("report.json", _json),
    "sarif": ("report.sarif", _sarif),
    "html": ("report.html", to_html),
    "text": ("report.txt", to_text),
}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never follow a planted link; mode 0o666 minus the umask, like a plain open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (full := StorageFullError.of(exc, path.name)):
            raise full from exc
        raise


def write_report(
    report: ScanReport, out_dir: Path, formats: Iterable[str] = ("json",)
) -> dict[str, Path]:
    """Write ``report.json`` (always) and the asked formats into ``out_dir``; format -> path."""
    wanted = ["json", *(f for f in formats if f != "json")]
    unknown = sorted(set(wanted) - FORMATS.keys())
    if unknown:
        raise ConfigError(
            f"unknown report format(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(FORMATS)}",
            details={"unknown": unknown, "known": list(FORMATS)},
        )
    written: dict[str, Path] = {}
    for fmt in dict.fromkeys(wanted):  # de-duplicated, in order
        name, render = FORMATS[fmt]
        path = Path(out_dir) / name
        atomic_write_text(path, render(report))
        written[fmt] = path
    return written


def load_report(path: Path | str) -> ScanReport:
    """Read and validate a ``report.json``."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SourceNotFoundError(f"no report at {p}; pass the path of a report.json") from e
    try:
        return ScanReport.model_validate_json(raw)
    except ValidationError as e:
        raise InputError(
            f"{p} is not a valid MergeShield scan report ({e.error_count()} problems); "
            "was it written by a different scanner version?",
            details=e.errors(include_url=False, include_input=False),
        ) from e


def schema_text() -> str:
    """The report's JSON Schema, as committed in ``mergeshield/schemas/report.schema.json``."""
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export_schema(path: Path = SCHEMA_PATH) -> Path:
    """Write the report's JSON Schema to ``path`` (the packaged schema file by default)."""
    atomic_write_text(Path(path), schema_text())
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the schema file: ``python -m mergeshield.report.schema_export [PATH]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    export_schema(Path(args[0]) if args else SCHEMA_PATH)
    return 0
