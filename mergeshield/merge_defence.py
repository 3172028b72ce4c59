"""How much of each cleaned model's correction enters a defended merge (issue 17).

A scan cleans a fine-tune against its own task only: its correction C = θ_cleaned − θ_suspect
(−λ·BV_inj and the unlearning vector U) is budgeted on that task. In a merge, C reaches every
other task too (docs/efficacy/README.md, "After test5": a task other than the repaired one loses
up to 16 points). So a plan merges each cleaned model as τ_suspect + γ·C and chooses γ on the merge
itself, with the accuracy budget over every task that has evaluation data:

- a scale is *safe* when every trigger the scans found (an inverted one read back from beside
  its report) no longer responds on the merge (the verdict's residual rule, ``still_responds``);
- among safe scales, the largest whose worst task costs at most ``budget_points`` against the
  undefended merge (more correction, within budget); if none is within budget, the safe scale with
  the smallest worst-task cost, and the report says by how much it misses;
- if no scale is safe, or nothing can be measured on the merge (no evaluation data, or no trigger
  found), the whole correction (γ = 1): the scan's own cleaning, security first.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

SCALES = (1.0, 0.75, 0.5, 0.25)  # γ tried, the whole correction first


class ScaleTried(BaseModel):
    """One γ measured on the merge: each task's accuracy cost (points against the undefended
    merge, by model) and whether every measurable found trigger was removed there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float
    cost_points: dict[str, float]
    removed: bool

    @property
    def worst(self) -> float:
        return max(self.cost_points.values(), default=0.0)


class MergeDefence(BaseModel):
    """What the plan chose and why (``PlanReport.defence``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float  # γ: the share of each cleaned model's correction in the merge
    budget_points: float
    tried: list[ScaleTried]
    within_budget: bool | None  # None: nothing measured on the merge
    message: str


def choose(tried: Sequence[ScaleTried], budget_points: float) -> MergeDefence:
    """The scale the rule above picks from the measured ``tried`` (in ``SCALES`` order)."""
    safe = [t for t in tried if t.removed]
    if not tried:
        return MergeDefence(scale=1.0, budget_points=budget_points, tried=[], within_budget=None,
                            message="nothing could be measured on the merge (no evaluation data, "
                                    "or no trigger found): each cleaned model merged whole")
    if not safe:
        return MergeDefence(scale=1.0, budget_points=budget_points, tried=list(tried),
                            within_budget=None,
                            message="a found trigger still responds on the merge at every scale "
                                    "tried: each cleaned model merged whole")
    within = [t for t in safe if t.worst <= budget_points + 1e-9]
    pick = max(within, key=lambda t: t.scale) if within else min(safe, key=lambda t: t.worst)
    over = pick.worst - budget_points
    message = (f"γ = {pick.scale:g} of each cleaned model's correction: every found trigger "
               f"removed on the merge, the worst task costs {pick.worst:.1f} points against the "
               f"undefended merge (budget {budget_points:g})")
    if not within:
        message += f": over the budget by {over:.1f} points at the gentlest safe scale"
    return MergeDefence(scale=pick.scale, budget_points=budget_points, tried=list(tried),
                        within_budget=bool(within), message=message)
