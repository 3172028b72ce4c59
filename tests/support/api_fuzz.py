"""schemathesis against the service's OpenAPI: every operation, positive and negative examples,
sent to a real running API with an admin key; any 5xx is a failure.

Each operation's cases come from ``APIOperation.as_strategy`` and are driven by hypothesis here
(derandomised, bounded, no shrinking), so the counts are ours to report: operations, examples
sent, and every 5xx with the request that caused it. Used by ``tests/service/test_api_fuzz.py``
and ``bench/reliability.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

# Operations with a known 5xx owned by work in progress elsewhere: reported, not failed on.
# "METHOD /path" -> why. Keep empty unless an owner has been told.
# operation → why it may answer 5xx for now; empty: none may (the webhook deliveries' offset
# overflow on SQLite that was listed here is fixed, d043831)
KNOWN_5XX: dict[str, str] = {}


@dataclass
class OperationResult:
    label: str  # "GET /v1/scans/{scan_id}"
    examples: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)  # "500 <curl command>"
    # modes that yield no case: negative for an operation whose only inputs are free-form
    # strings (a path id), or with no inputs at all, cannot exist
    no_cases: list[str] = field(default_factory=list)

    @property
    def known(self) -> str | None:
        return KNOWN_5XX.get(self.label)


@dataclass
class FuzzReport:
    operations: list[OperationResult]
    seconds: float

    @property
    def examples(self) -> int:
        return sum(o.examples for o in self.operations)

    def failures(self, *, include_known: bool = False) -> list[OperationResult]:
        return [o for o in self.operations if o.server_errors and (include_known or not o.known)]


def fuzz(base_url: str, headers: dict[str, str], max_examples: int = 10) -> FuzzReport:
    """Send up to ``max_examples`` positive and as many negative cases to every operation."""
    t0 = time.perf_counter()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    results: list[OperationResult] = []
    for item in schema.get_all_operations():
        op = item.ok()
        result = OperationResult(f"{op.method.upper()} {op.path}")
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _drive(op.as_strategy(generation_mode=mode), base_url, headers, result,
                       max_examples)
            except Unsatisfiable:
                result.no_cases.append(mode.value)
        results.append(result)
    return FuzzReport(results, round(time.perf_counter() - t0, 1))


def _drive(strategy: Any, base_url: str, headers: dict[str, str], result: OperationResult,
           max_examples: int) -> None:
    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def send(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        result.examples += 1
        result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            result.server_errors.append(f"{response.status_code} {response.text[:200]!r} "
                                        f"from: {case.as_curl_command()[:600]}")
    send()
