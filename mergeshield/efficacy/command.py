"""``mergeshield bench efficacy``: its arguments and what it prints.

Only argparse at import: ``cli.py`` builds its parser on every call, the bench's torch-heavy
modules are imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# (planted attacks, clean fine-tunes)
SIZES = {"dev": (6, 6), "test": (40, 40), "ci": (1, 1), "test2": (40, 40), "test3": (40, 40),
         "test4": (40, 40), "test5": (40, 40), "test6": (40, 40)}


def add_parser(sub: Any) -> None:
    """Add ``efficacy`` to the ``bench`` sub-parsers."""
    be = sub.add_parser("efficacy", help="hold-out efficacy bench (issue 12): drawn attacks vs "
                        "every defence, written to docs/efficacy/")
    be.add_argument("--zoo", type=Path, required=True, help="a default-scale zoo "
                    "(`mergeshield zoo build DIR --families vit`)")
    be.add_argument("--split", choices=sorted(SIZES), default="dev",
                    help="dev: design on it; test to test6: disjoint seeds, each run once for "
                    "the final numbers (test to test5 are spent: the next design is scored on "
                    "test6)")
    be.add_argument("--family", choices=("vit", "clip"), default="vit",
                    help="the zoo family attacked and defended (its pages and results.json key "
                    "get a -clip suffix); the zoo must hold it (`--families clip`)")
    be.add_argument("--attacks", type=int, help="planted attacks wanted (dev 6, test 40)")
    be.add_argument("--clean", type=int, help="clean fine-tunes (dev 6, test 40)")
    be.add_argument("--families", help="comma-separated subset of the attack families "
                    "(default: all; a different set draws different attacks)")
    be.add_argument("--defences", help="comma-separated subset, e.g. product (default: all)")
    be.add_argument("--out", type=Path, default=Path("docs/efficacy"))
    be.add_argument("--work", type=Path, help="suspects and scan outputs (default: "
                    "<zoo>/efficacy-work/<split>)")
    be.add_argument("--resume", action="store_true", help="reuse the cases earlier runs "
                    "(or shards) of the same split and defences journaled in <work>/cases*.jsonl")
    be.add_argument("--shard", help="I/N: run shard I of N in this process (start N at once, "
                    "then one run with --resume writes the results)")
    be.add_argument("--cache-dir", type=Path, help="the scans' BV_inj cache (default: "
                    "<zoo>/efficacy-work/bv-cache)")
    be.add_argument("--scan", action="append", default=[], metavar="FIELD=JSON",
                    help="a ScanRequest field set on every scan defence, product included, "
                    "e.g. --scan 'unlearning={\"epochs\": 2}' (the design loop: results then "
                    "measure that variant, recorded in meta.product_request; use its own --work)")


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise SystemExit(f"--shard wants I/N with 0 <= I < N, got {text!r}")
    return int(i), int(n)


def _scan_overrides(items: list[str]) -> dict[str, Any]:
    """``FIELD=JSON`` items as a dict; ValueError names the first bad one."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            key = ""
        if not key:
            raise ValueError(f"--scan wants FIELD=JSON, got {item!r}")
    return out


def run(args: argparse.Namespace) -> int:
    from mergeshield.efficacy.attacks import FAMILIES
    from mergeshield.efficacy.bench import DEFENCES, BenchConfig
    from mergeshield.efficacy.runner import run_efficacy
    from mergeshield.efficacy.world import WorldConfig
    from mergeshield.pipeline import ScanRequest

    attacks, clean = SIZES[args.split]
    label = args.split if args.family == "vit" else f"{args.split}-{args.family}"
    work = args.work or args.zoo / "efficacy-work" / label
    defences = tuple(args.defences.split(",")) if args.defences else DEFENCES
    unknown = sorted(set(defences) - set(DEFENCES))
    if unknown:
        sys.stderr.write(f"unknown defence(s) {unknown}: choose from {', '.join(DEFENCES)}\n")
        return 4
    families = tuple(args.families.split(",")) if args.families else FAMILIES
    if set(families) - set(FAMILIES):
        sys.stderr.write(f"unknown families: choose from {', '.join(FAMILIES)}\n")
        return 4
    try:
        overrides = _scan_overrides(args.scan)
        ScanRequest(suspect="s", base="b", **overrides)
    except ValueError as e:  # pydantic's ValidationError is one
        sys.stderr.write(f"{e}\n")
        return 4
    cfg = BenchConfig(zoo=args.zoo, work=work, split=args.split, defences=defences,
                      families=families,
                      attacks=args.attacks or attacks,
                      clean=clean if args.clean is None else args.clean,
                      cache_dir=args.cache_dir or args.zoo / "efficacy-work" / "bv-cache",
                      resume=args.resume, shard=_shard(args.shard),
                      scan_overrides=overrides, world=WorldConfig(family=args.family))
    verbose = os.environ.get("MERGESHIELD_BENCH_QUIET") is None

    def say(stage: str, fraction: float) -> None:
        if verbose:
            sys.stderr.write(f"[{fraction:4.0%}] {stage}\n")
            sys.stderr.flush()

    if cfg.shard is not None:
        from mergeshield.efficacy.bench import Bench

        Bench(cfg, say).run_shard(*cfg.shard)
        sys.stdout.write(f"shard {args.shard} journaled in {work}; when every shard is done: "
                         "the same command without --shard, with --resume\n")
        return 0
    done = run_efficacy(cfg, args.out, say)
    meta = done["meta"]
    lines = [f"wrote {', '.join(done['files'])} to {args.out}: {meta['planted']} planted of "
             f"{meta['drawn']} drawn, {meta['clean']} clean, {meta['wall_seconds'] / 60:.1f} min"]
    for name, groups in done["summary"]["defences"].items():
        s, d = groups["overall"]["single"], groups["overall"]["detection"]
        if s is None:
            continue
        det = "" if d is None else f", TPR {d['tpr']['rate']:.2f} FPR {d['fpr']['rate']:.2f}"
        lines.append(f"{name}: ASR {s['asr_before']:.1%} -> {s['asr_after']:.1%} (cut "
                     f"{s['relative_cut']:.1%}), cost {s['accuracy_cost_points']:+.1f} pts{det}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
