"""A watch's optional report to the model's authors: a discussion on the scanned Hub repo with
the verdict, opened through ``huggingface_hub``'s ``create_discussion`` with the service's
token (``HF_TOKEN``, which must be allowed to write discussions there).

It is an outbound delivery like a callback (``worker.callbacks``): it waits for the scan, is
retried with the same backoff, can die and be redelivered; only a succeeded scan is reported.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import HfApi

from mergeshield.settings import Settings
from worker.db import Delivery, Scan

PREFIX = "hf-discussion:"  # a discussion delivery's ``url``: the prefix and the repo id


def delivery(scan: Scan) -> Delivery:
    """The waiting delivery of a discussion about ``scan`` (a hub suspect); add it with the scan."""
    return Delivery(owner=scan.owner, direction="outbound", state="waiting",
                    url=PREFIX + scan.suspect, scan_id=scan.id, dedup_key=f"discussion:{scan.id}")


def is_discussion(row: Delivery) -> bool:
    return row.endpoint_id is None and (row.url or "").startswith(PREFIX)


def text(event: dict[str, Any]) -> tuple[str, str]:
    """Title and Markdown body for a ``scan.succeeded`` event (``callbacks.scan_event``)."""
    data = event["data"]
    verdict = (data.get("summary") or {}).get("verdict") or {}
    title = f"MergeShield scan: {data['verdict']} ({data['severity']})"
    reasons = "\n".join(f"- {r}" for r in verdict.get("reasons", [])) or "- (none given)"
    body = (f"An automated [MergeShield](https://arxiv.org/abs/2510.08016) scan of commit "
            f"`{data.get('suspect_revision')}` against the base `{data['base']}` "
            f"(revision `{data.get('base_revision') or 'main'}`) found: "
            f"**{data['verdict']}**, severity **{data['severity']}**.\n\n{reasons}\n\n"
            f"Scan id `{data['id']}`; the full report is on the service that ran it.")
    return title, body


def post(row: Delivery, settings: Settings) -> None:
    """Open the discussion (raises what ``huggingface_hub`` raises when the Hub refuses)."""
    title, body = text(row.payload)
    HfApi(endpoint=settings.hf_endpoint, token=settings.token()).create_discussion(
        repo_id=(row.url or "")[len(PREFIX):], title=title, description=body)
