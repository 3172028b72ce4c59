"""The new-scan form: its defaults (the API's own) and its fields turned into a ``ScanCreate``;
the new-merge form's into a ``MergeCreate``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from mergeshield.ibvs import Focus, InjectionRecipe
from service.schemas import MergeCreate, ScanCreate, ScanOptions

CHECKBOXES = ("probes", "inversion", "focus_agree", "force")


def defaults() -> dict[str, str]:
    """The form's initial values, taken from the API's defaults so the two never disagree."""
    opts, recipe, focus = ScanOptions(), InjectionRecipe(), Focus()
    return {
        "budget_points": f"{opts.budget_points:g}",
        "lambdas": ", ".join(f"{x:g}" for x in opts.lambdas),
        "fixed_lambda": "", "max_eval": str(opts.max_eval or ""),
        "min_asr_gap": f"{opts.min_asr_gap:g}", "seed": str(opts.seed),
        "inversion_steps": str(opts.inversion_steps),
        "recipe_mode": recipe.mode, "recipe_epochs": str(recipe.epochs),
        "recipe_poison_rate": f"{recipe.poison_rate:g}", "focus_keep": f"{focus.keep:g}",
        "device": "auto",
        **{k: "on" for k, on in (("probes", opts.probes), ("inversion", opts.inversion),
                                 ("focus_agree", focus.agree_with_suspect)) if on},
    }


def scan_create(form: Mapping[str, str]) -> ScanCreate:
    """The form's fields as the API's request body (``ValidationError`` names bad fields)."""
    def text(name: str) -> str | None:
        return (form.get(name) or "").strip() or None

    def ref(role: str) -> dict[str, Any]:
        out = {"hub": text(f"{role}_hub"), "upload": text(f"{role}_upload"),
               "revision": text(f"{role}_revision")}
        if out["upload"] and not out["hub"]:  # a chosen upload wins over an empty hub field
            out.pop("revision")
        return {k: v for k, v in out.items() if v is not None}

    lambdas = text("lambdas")
    options: dict[str, Any] = {
        "budget_points": text("budget_points"), "fixed_lambda": text("fixed_lambda"),
        "max_eval": text("max_eval"), "min_asr_gap": text("min_asr_gap"),
        "seed": text("seed"), "inversion_steps": text("inversion_steps"),
        "lambdas": [x.strip() for x in lambdas.split(",") if x.strip()] if lambdas else None,
        "probes": "probes" in form, "inversion": "inversion" in form,
        "recipe": {k: v for k, v in (("mode", text("recipe_mode")),
                                     ("epochs", text("recipe_epochs")),
                                     ("poison_rate", text("recipe_poison_rate"))) if v},
        "focus": {"agree_with_suspect": "focus_agree" in form,
                  **({"keep": text("focus_keep")} if text("focus_keep") else {})},
    }
    body: dict[str, Any] = {
            "suspect": ref("suspect"), "base": ref("base"), "evaluation": text("evaluation"),
            "evaluation_revision": text("evaluation_revision"),
            "injection_data": text("injection_data"), "device": text("device") or "auto",
            "callback_url": text("callback_url"),
            "force": "force" in form,
            "options": {k: v for k, v in options.items() if v is not None}}
    return ScanCreate.model_validate({k: v for k, v in body.items() if v is not None})


def errors_of(exc: ValidationError) -> list[str]:
    """One readable line per problem, naming the form's part ("suspect", "options.seed")."""
    out = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("ModelRef",))
        out.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return out


def merge_create(form: Mapping[str, str]) -> MergeCreate:
    """The new-merge form as the API's request body: the plan pasted as it is (YAML or JSON)."""
    callback = (form.get("callback_url") or "").strip() or None
    return MergeCreate.model_validate({"plan": form.get("plan") or "",
                                       "device": (form.get("device") or "auto").strip(),
                                       "callback_url": callback})
