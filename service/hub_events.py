"""The Hugging Face Hub's webhook, understood: which watches may hear it, which commit of which
model repo it announces, and the scans (or merges) it queues.

Payload (https://huggingface.co/docs/hub/webhooks): ``event.scope`` ``repo.content`` announces
new commits (action ``update``); ``repo.type``/``repo.name`` name the repo; ``updatedRefs[]``
lists ``{ref, oldSha, newSha}`` (``newSha`` null when a ref is deleted) and ``repo.headSha`` is
the head of ``main``. Only a new commit on ``main`` of a model repo is scanned.

A watch either scans the repos its rule names, or (``merge``, issue 17) holds a merge plan and
matches the hub repos the plan follows on ``main`` (``watched_repos``: an entry, model or base,
named without a revision or at ``@main``): a new commit of one re-runs the plan as a merge
(``queue_merge``) with each such entry of that repo pinned at the commit (mergekit's
``org/name@<sha>``). Every other entry stays as written: one pinned at a commit stays there, and a
tag or another branch is not moved by a push to ``main``; so a plan naming ``org/m`` and
``org/m@<sha>`` merges the new commit with the old one. The watch row keeps the checked plan as
JSON (``Watch.merge``, migration 0005), so matching stays the Python filter it is for prefixes. Both
kinds share the secret check, the rate limit, the de-duplication (an idempotency key from the job's
canonical body: the same plan with the same pinned commits is one merge) and the delivery record,
whose ``scan_ids`` name the merge.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from starlette.datastructures import State

from mergeshield.errors import (
    ConfigError,
    MergeShieldError,
    WebhooksDisabledError,
    WebhookSecretError,
)
from mergeshield.merge_plan_schema import split_revision
from service.auth import Principal
from service.idempotency import body_sha256, by_idempotency
from service.routes.merges import queue_merge
from service.routes.scans import queue_scan
from service.schemas import HUB_ID, MergeCreate, ModelRef, ScanCreate
from worker import discussions
from worker.db import Scan, Watch, now

SHA = re.compile(r"^[0-9a-f]{40}$")
MAIN = "refs/heads/main"
FOLLOWS_MAIN = (None, "main", MAIN)  # a plan entry's revision that a push to main moves
SECRET_HEADERS = ("x-webhook-secret", "authorization", "cookie")


@dataclass(frozen=True)
class Commit:
    repo: str
    sha: str


@dataclass
class Outcome:
    """What one delivery did: its state, why, and the scans it queued or found."""

    state: str
    reason: str | None = None
    scan_ids: list[str] = field(default_factory=list)
    watch_ids: list[str] = field(default_factory=list)
    owner: str | None = None


def repo_name(payload: Any) -> str | None:
    repo = payload.get("repo") if isinstance(payload, dict) else None
    name = repo.get("name") if isinstance(repo, dict) else None
    return name if isinstance(name, str) and re.match(HUB_ID, name) else None


def commit_of(payload: Any) -> Commit | str:
    """The new ``main`` commit of a model repo the payload announces, or why there is none."""
    if not isinstance(payload, dict):
        return "the payload is not a JSON object"
    event = _obj(payload.get("event"))
    scope, action = event.get("scope"), event.get("action")
    if scope != "repo.content":
        return f"event scope {scope!r}: only 'repo.content' (new commits) starts a scan"
    if action == "delete":
        return "a deletion"
    repo = _obj(payload.get("repo"))
    if repo.get("type") != "model":
        return f"a {repo.get('type')!r} repo: only model repos are scanned"
    name = repo_name(payload)
    if name is None or not re.match(HUB_ID, name):
        return "the payload names no valid repo (repo.name)"
    refs = payload.get("updatedRefs")
    if isinstance(refs, list):
        main = next((r for r in refs if isinstance(r, dict) and r.get("ref") == MAIN), None)
        if main is None:
            changed = [r.get("ref") for r in refs if isinstance(r, dict)]
            return f"no new commit on main (updated refs: {changed})"
        sha = main.get("newSha")
        if not sha or set(str(sha)) == {"0"}:
            return "main was deleted"
    else:
        sha = repo.get("headSha")
    if not isinstance(sha, str) or not SHA.match(sha):
        return "the payload carries no commit sha"
    return Commit(name, sha)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matching_watches(state: State, repo: str | None) -> list[Watch]:
    """Watches whose rule names ``repo`` exactly, or as a prefix, or whose plan follows it."""
    if repo is None:
        return []
    with state.db.session() as s:
        rows = s.scalars(select(Watch).order_by(Watch.created_at)).all()
    return [w for w in rows if (repo in watched_repos(w.merge) if w.merge is not None else
                                w.repo == repo or (w.prefix and repo.startswith(w.repo)))]


def watched_repos(plan: dict[str, Any]) -> list[str]:
    """The hub repos whose new ``main`` commit re-runs a checked plan (its base, then its
    models): those with an entry that follows ``main``, without their revisions."""
    names = (plan["base_model"], *(m["model"] for m in plan["models"]))
    return list(dict.fromkeys(split_revision(n)[0] for n in names if follows_main(n)))


def pinned(plan: dict[str, Any], found: Commit) -> dict[str, Any]:
    """The plan with each entry of the commit's repo that follows ``main`` (a model, the base, an
    evaluation key) pinned at the commit; every other entry as written. Raises ``ConfigError``
    when pinning makes two evaluation keys one with two datasets (``org/m`` and ``org/m@<sha>``
    at the pushed sha): the plan would no longer say which task that model is measured on."""
    def pin(name: str) -> str:
        moves = follows_main(name) and split_revision(name)[0] == found.repo
        return f"{found.repo}@{found.sha}" if moves else name
    options = plan.get("mergeshield") or {}
    evaluation: dict[str, str] = {}
    for key, dataset in (options.get("evaluation") or {}).items():
        if (first := evaluation.setdefault(pin(key), dataset)) != dataset:
            raise ConfigError(
                f"at {found.repo}@{found.sha} the plan names one model with two evaluation "
                f"datasets ({first}, {dataset}); pin the entries at different commits or give "
                "them one dataset", details={"field": "merge"})
    return {**plan, "base_model": pin(plan["base_model"]),
            "models": [{**m, "model": pin(m["model"])} for m in plan["models"]],
            "mergeshield": {**options, "evaluation": evaluation}}


def follows_main(name: str) -> bool:
    """Whether a plan's entry moves with its repo's ``main`` (no revision, or ``@main``)."""
    return split_revision(name)[1] in FOLLOWS_MAIN


def authorize(state: State, watches: list[Watch], given: str | None) -> list[Watch]:
    """The watches this delivery may act for: all of them with the global secret, else those
    whose own secret it carries. Raises when no secret applies or the header matches none."""
    configured = state.settings.webhook_secret
    if configured is None and not any(w.secret_hash for w in watches):
        raise WebhooksDisabledError(
            "no webhook secret is configured (MERGESHIELD_WEBHOOK_SECRET, or a watch's secret): "
            "every delivery is refused")
    if not given:
        raise WebhookSecretError("send the webhook's secret in the X-Webhook-Secret header")
    global_ok = configured is not None and hmac.compare_digest(
        given.encode(), configured.get_secret_value().encode())
    digest = secret_hash(given)
    own = [w for w in watches
           if w.secret_hash is not None and hmac.compare_digest(digest, w.secret_hash)]
    if not global_ok and not own:
        raise WebhookSecretError("the X-Webhook-Secret header does not match the secret")
    return watches if global_ok else own


def act(state: State, payload: Any, watches: list[Watch]) -> Outcome:
    """Queue a scan of the announced commit for each watch (a plan's watch: its merge),
    de-duplicated and rate-limited."""
    found = commit_of(payload)
    if isinstance(found, str):
        return Outcome("ignored", found, owner=_owner(watches))
    if not watches:
        return Outcome("ignored", f"no watch matches {found.repo}")
    outcome = Outcome("ignored", watch_ids=[w.id for w in watches], owner=_owner(watches))
    states, reasons = [], []
    for watch in watches:
        job_for = _scan_for if watch.merge is None else _merge_for
        result, scan_id, reason = job_for(state, watch, found)
        states.append(result)
        if scan_id is not None:
            outcome.scan_ids.append(scan_id)
        if reason is not None:
            reasons.append(f"watch {watch.id}: {reason}")
    outcome.state = next(s for s in STATES if s in states)
    outcome.reason = "; ".join(reasons) or None
    return outcome


STATES = ("accepted", "duplicate", "rate_limited", "failed")  # the first present names the whole


def _scan_for(state: State, watch: Watch, found: Commit) -> tuple[str, str | None, str | None]:
    """One watch's scan of the commit: (accepted|duplicate|rate_limited|failed, scan, reason).
    A watch that cannot queue (its base upload was deleted, its callback URL is refused) fails
    alone, recorded with the reason, and the Hub still gets a 2xx: retrying would not help."""
    assert watch.scan is not None  # a scan's watch
    try:
        body = ScanCreate.model_validate({
            **watch.scan, "suspect": ModelRef(hub=found.repo, revision=found.sha),
            "callback_url": watch.callback_url})
    except ValidationError as exc:  # a watch stored before today's option bounds
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return "failed", None, f"invalid_config: the watch's scan options are invalid ({bad[:300]})"
    def queue(caller: Principal, key: str) -> tuple[Scan, bool]:
        scan, created = queue_scan(state, caller, body, key)
        if created and watch.open_discussion:
            with state.db.session() as s:
                s.add(discussions.delivery(scan))
        return scan, created
    return _queue_once(state, watch, dedup_key(body), queue)


def _merge_for(state: State, watch: Watch, found: Commit) -> tuple[str, str | None, str | None]:
    """A plan's watch: its plan as a merge, the announced repo pinned at the commit."""
    assert watch.merge is not None
    try:
        plan = pinned(watch.merge, found)
    except ConfigError as exc:
        return "failed", None, f"{exc.code}: {exc.message}"
    body = MergeCreate(plan=plan, callback_url=watch.callback_url)
    return _queue_once(state, watch, "hub-merge:" + body_sha256(body),
                       lambda caller, key: (queue_merge(state, caller, body, key, watch.id),
                                            True))


def _queue_once(state: State, watch: Watch, key: str,
                queue: Callable[[Principal, str], tuple[Scan, bool]]
                ) -> tuple[str, str | None, str | None]:
    """The job made with ``key`` if there is one (duplicate), else one queued in the watch's
    rate limit: (accepted|duplicate|rate_limited|failed, job id, reason)."""
    caller = Principal(watch.owner, admin=False)
    job = by_idempotency(state.db, caller, key)
    if job is not None:
        return "duplicate", job.id, None
    if not take_token(state, watch):
        return "rate_limited", None, (f"over its rate limit of {watch.rate_limit} jobs per "
                                      f"{watch.rate_window} s; nothing was queued")
    try:
        job, created = queue(caller, key)
    except MergeShieldError as exc:
        return "failed", None, f"{exc.code}: {exc.message}"
    return ("accepted" if created else "duplicate"), job.id, None


def dedup_key(body: ScanCreate) -> str:
    """(repo, commit, configuration) as an idempotency key: one scan per distinct triple."""
    return "hub:" + body_sha256(body)


def take_token(state: State, watch: Watch) -> bool:
    """Count one scan in the watch's window (a new window once the old one has passed);
    False when the window is full. Two conditional UPDATEs: atomic on both databases."""
    t = now()
    with state.db.session() as s:
        s.execute(update(Watch).where(
            Watch.id == watch.id, Watch.window_start <= t - timedelta(seconds=watch.rate_window))
            .values(window_start=t, window_count=0))
        took = s.execute(update(Watch).where(Watch.id == watch.id,
                                             Watch.window_count < Watch.rate_limit)
                         .values(window_count=Watch.window_count + 1))
    return bool(took.rowcount)


def recorded_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in SECRET_HEADERS}


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _owner(watches: list[Watch]) -> str | None:
    """The one owner of these watches; None (the admin's) when they are several or none."""
    owners = {w.owner for w in watches}
    return owners.pop() if len(owners) == 1 else None
