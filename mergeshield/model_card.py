"""The model card's claim about a checkpoint's base, cross-checked against the base given.

conventions.md: the base is an explicit input, cross-checked against the card's ``base_model``.
A suspect whose card (README.md front matter) names a base other than the one given is refused
(``incompatible_models``) rather than reported on: its task vector against the wrong base
measures the difference of two unrelated models, so every figure in the report would be noise,
and "scan it against another base" is a way to make a backdoor look clean.

The given base is recognised by its hub repo id, or for a local folder or upload by the repo id
its ``config.json`` was saved from (``_name_or_path``). A local base that names no repo cannot be
confirmed to be the card's base and is refused too: give the base by its hub id instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mergeshield.errors import IncompatibleModelsError

__all__ = ["card_base_models", "check_card_base"]

MAX_CARD_BYTES = 256 * 1024  # the front matter sits at the top; the rest of a card is prose
_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.S)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_URL = re.compile(r"^https?://(www\.)?huggingface\.co/", re.I)


def card_base_models(root: Path) -> list[str]:
    """The repo ids ``root/README.md``'s front matter gives as ``base_model`` ([] if none)."""
    card = root / "README.md"
    if not card.is_file():
        return []
    with open(card, "rb") as f:
        head = f.read(MAX_CARD_BYTES).decode("utf-8", "replace")
    match = _FRONT_MATTER.match(head)
    if match is None:
        return []
    try:
        meta: Any = yaml.safe_load(match.group(1))
    except (yaml.YAMLError, RecursionError, ValueError):
        return []  # an unreadable card makes no claim; the weights are checked regardless
    named = meta.get("base_model") if isinstance(meta, dict) else None
    names = [named] if isinstance(named, str) else named if isinstance(named, list) else []
    return [_normal(n) for n in names[:32] if isinstance(n, str) and _REPO_ID.match(_normal(n))]


def check_card_base(suspect_root: Path, base_source: str, base_kind: str,
                    base_config: dict[str, Any] | None) -> None:
    """Refuse (IncompatibleModelsError) when the suspect's card names bases and the given one
    is none of them."""
    claimed = card_base_models(suspect_root)
    if not claimed:
        return
    known = {_normal(base_source)} if base_kind == "hub" else set()
    saved_from = (base_config or {}).get("_name_or_path")
    if isinstance(saved_from, str) and _REPO_ID.match(_normal(saved_from)):
        known.add(_normal(saved_from))
    if {c.lower() for c in claimed} & {k.lower() for k in known}:
        return
    given = next(iter(known), None)
    said = " or ".join(repr(c) for c in claimed)
    raise IncompatibleModelsError(
        f"the suspect's model card says it was fine-tuned from {said}, but the given base "
        + (f"is {given!r}" if given else "is a local model that names no hub repo")
        + f": scan it against {claimed[0]!r} (give the base by that hub id)",
        details={"card_base_model": claimed, "given_base": given})


def _normal(name: str) -> str:
    return _HUB_URL.sub("", name.strip()).rstrip("/")
