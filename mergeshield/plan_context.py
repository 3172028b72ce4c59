"""Where a merge plan runs: its output folder, caches and hub access (``PlanContext``), and how
a model name of the plan is read (a hub id at a revision, a local folder, an upload's file)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeshield import adapters, checkpoints
from mergeshield.merge_plan_schema import split_revision


@dataclass
class PlanContext:
    out_dir: Path  # the merged model; scans' outputs under out_dir/scans/<i>
    cache_dir: Path | None = None
    device: str | None = None
    local_files_only: bool = False
    hub: dict[str, Any] = field(default_factory=dict)  # token, endpoint
    # for a service (the CLI sets none): the plan's progress as (stage, percent of the whole
    # plan); what a model name is read from (an upload's file: reports and __metadata__ keep
    # the name); the local folders the scans may read and the free disk a download must leave
    # (ScanContext's allowed_roots and min_free_bytes); the lock a BV_inj is built under,
    # spanning a service's workers (ScanContext's bv_guard)
    progress: Callable[[str, float], None] | None = None
    sources: dict[str, str] = field(default_factory=dict)
    allowed_roots: tuple[Path, ...] | None = None
    min_free_bytes: int | None = None
    bv_guard: Callable[[str], AbstractContextManager[None]] | None = None


def located(name: str, ctx: PlanContext) -> tuple[str, str | None]:
    """What a plan's model ``name`` is read from, and at which revision (``org/name@rev``)."""
    source = ctx.sources.get(name, name)
    repo, revision = split_revision(source)
    if revision is not None and not Path(source).expanduser().exists():
        return repo, revision
    return source, None


def resolve(source: str, ctx: PlanContext) -> checkpoints.ResolvedSource:
    path, revision = located(source, ctx)
    return checkpoints.resolve(path, revision=revision, local_files_only=ctx.local_files_only,
                               cache_dir=ctx.cache_dir, **ctx.hub)


def resolve_model(source: str, base_src: checkpoints.ResolvedSource, ctx: PlanContext
           ) -> checkpoints.ResolvedSource:
    """A plan's model as it is merged: a LoRA adapter as the model it makes with the base."""
    return adapters.as_model(resolve(source, ctx), base_src, cache_dir=ctx.cache_dir)
