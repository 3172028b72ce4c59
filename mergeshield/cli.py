"""The ``mergeshield`` command line: scan, zoo build, bv, merge, bench paper / efficacy.

Exit codes (conventions.md): 0 no finding at or above ``--fail-on``; 1 findings; 2 error or
incomplete scan; 3 nothing scannable; 4 usage. Progress goes to stderr on a terminal only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mergeshield import __version__
from mergeshield.efficacy import command as efficacy_command
from mergeshield.errors import MergeShieldError, NothingScannableError, as_mergeshield_error
from mergeshield.settings import Settings

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_NOTHING, EXIT_USAGE = 0, 1, 2, 3, 4


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2; conventions say 4 for usage
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        msg = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


Extension = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def build_parser(extend: Extension | None = None) -> argparse.ArgumentParser:
    """The command line; ``extend`` adds sub-commands (the service adds serve, api, worker…)."""
    p = _Parser(prog="mergeshield", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"mergeshield {__version__}")
    sub: Any = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    if extend is not None:
        extend(sub)

    s = sub.add_parser("scan", help="scan a fine-tuned checkpoint against its base and clean it")
    s.add_argument("suspect", help="hub repo id, HF-layout folder, .safetensors or .bin")
    s.add_argument("--base", required=True, help="the base model it was fine-tuned from")
    s.add_argument("--revision", help="suspect revision (branch, tag or sha)")
    s.add_argument("--base-revision")
    s.add_argument("--eval", dest="evaluation",
                   help="evaluation dataset: folder, bundled name or hub id")
    s.add_argument("--eval-revision")
    s.add_argument("--image-size", type=int,
                   help="resize every evaluation image to this side (default: as stored; a "
                        "folder of mixed sizes is resized to the model's input side)")
    s.add_argument("--inject-data", help="the defender's data for BV_inj (default: --eval)")
    s.add_argument("--inject-epochs", type=int,
                   help="BV_inj's paired fine-tunes: epochs (default 4; fewer is cheaper, "
                        "a weaker BV_inj)")
    s.add_argument("--inject-max-train", type=int,
                   help="BV_inj's paired fine-tunes: images of the defender's data used "
                        "(default 2000)")
    s.add_argument("--out", type=Path, help="write the cleaned checkpoint and report.json here")
    s.add_argument("--report", default="json", help="report files: json,sarif,html,text")
    s.add_argument("--format", choices=["text", "json", "sarif"], default="text",
                   help="what to print on stdout")
    s.add_argument("--fail-on", default="MEDIUM", choices=["LOW", "MEDIUM", "HIGH", "CRITICAL"])
    s.add_argument("--trigger", action="append", default=[],
                   help="a trigger to measure, e.g. patch:checkerboard:3:bottom_right, or "
                        "@triggers.json: a JSON list of triggers or {\"trigger\": ..., "
                        "\"target\": N} (repeatable)")
    s.add_argument("--target", action="append", type=int, default=[],
                   help="target class of the matching --trigger (default: its best class)")
    s.add_argument("--no-probes", action="store_true", help="skip the probe panel")
    s.add_argument("--no-inversion", action="store_true", help="skip trigger inversion")
    s.add_argument("--no-unlearning", action="store_true",
                   help="IBVS alone, as the paper states it: no trigger unlearning after it")
    s.add_argument("--lambdas", type=_floats, help="λ grid, e.g. 0,0.5,1,2")
    s.add_argument("--lambda", dest="fixed_lambda", type=float, help="use this λ, no choice")
    s.add_argument("--bv", help="subtract this BV (from `bv compute`) instead of building BV_inj")
    s.add_argument("--budget", type=float, default=2.0, help="max clean-accuracy drop (points)")
    s.add_argument("--max-eval", type=int, default=1000, help="test images evaluated")
    s.add_argument("--device", help="cuda or cpu (default: CUDA when present)")
    s.add_argument("--offline", action="store_true", help="use the local hub cache only")

    z = sub.add_parser("zoo", help="the tiny offline model zoo")
    zsub = z.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    zb = zsub.add_parser("build", help="pre-train bases and fine-tune clean/backdoored models")
    zb.add_argument("out", type=Path)
    zb.add_argument("--quick", action="store_true", help="CI size: about a minute on 2 cores")
    zb.add_argument("--families", default="vit,clip")
    zb.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("bv", help="backdoor vectors: compute and compare")
    bsub = b.add_subparsers(dest="bv_command", required=True, parser_class=_Parser)
    bc = bsub.add_parser("compute", help="BV = backdoored − clean")
    bc.add_argument("--clean", required=True)
    bc.add_argument("--backdoored", required=True)
    bc.add_argument("--out", type=Path, required=True, help="folder for model.safetensors")
    bc.add_argument("--base", help="the base model, when --clean or --backdoored is a LoRA "
                                   "adapter (read as the model it makes with this base)")
    bm = bsub.add_parser("compare", help="cosine matrix of BVs (files written by bv compute)")
    bm.add_argument("bvs", nargs="+")
    bm.add_argument("--per-tensor", action="store_true")

    m = sub.add_parser("merge", help="merge fine-tuned models (Task Arithmetic / TIES / DARE)")
    m.add_argument("models", nargs="+")
    m.add_argument("--base", required=True)
    m.add_argument("--method", choices=["task_arithmetic", "ties", "dare_ties", "dare_linear"],
                   default="task_arithmetic")
    m.add_argument("--weights", type=_floats, default=[0.3], help="λ per model, or one for all")
    m.add_argument("--keep", type=float, default=0.2, help="TIES: fraction kept per vector; "
                   "DARE: each entry's chance of being kept (mergekit's density)")
    m.add_argument("--seed", type=int, default=0, help="DARE: the seed of its random drops")
    m.add_argument("--subtract", help="a BV to subtract after merging (IBVS)")
    m.add_argument("--subtract-lambda", type=float, default=1.0)
    m.add_argument("--out", type=Path, required=True)

    mp = sub.add_parser("merge-plan", help="scan every model of a mergekit plan, merge what "
                        "its policy keeps (cleaned by default) and measure the merge")
    mp.add_argument("plan", type=Path, help="a mergekit YAML, with an optional mergeshield: "
                    "section (policy: clean|exclude|include; evaluation: {model: dataset})")
    mp.add_argument("--out", type=Path, required=True, help="the merged model (scans under "
                    "OUT/scans/<i>)")
    mp.add_argument("--format", choices=["text", "json"], default="text")
    mp.add_argument("--device", help="cuda or cpu (default: CUDA when present)")
    mp.add_argument("--offline", action="store_true", help="use the local hub cache only")

    bn = sub.add_parser("bench", help="reproduce the paper's experiments on the zoo")
    bnsub = bn.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    bp = bnsub.add_parser("paper", help="tables, plots and results.json (arXiv:2510.08016)")
    bp.add_argument("--out", type=Path, required=True, help="folder for the results")
    bp.add_argument("--quick", action="store_true", help="CI size: reduced grids, quick zoo")
    bp.add_argument("--zoo", type=Path, help="an existing zoo (built there when it has no "
                    "manifest.json; a temporary one when omitted)")
    bp.add_argument("--seed", type=int, default=0)
    bp.add_argument("--only", type=_ints, default=[1, 2, 3, 4, 5, 6],
                    help="experiments to run, e.g. 1,2 (1-6 exist); results.json keeps the "
                    "others' earlier results")
    bp.add_argument("--scale", choices=["cpu", "gpu"], default="cpu", help="gpu: a ~25 M-"
                    "parameter ViT zoo trained and evaluated on CUDA (needs a GPU; not --quick)")
    bp.add_argument("--check", action="store_true", help="exit 1 when a claim of claims.md "
                    "fails (the qualitative claims asserted at this scale)")
    efficacy_command.add_parser(bnsub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every error leaves as ``{"error": {code, message, details}}`` on stderr
    with exit 2 (3: nothing scannable), never a traceback and never 1, which means findings."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except NothingScannableError as exc:
        _error(exc)
        return EXIT_NOTHING
    except Exception as exc:  # the one mapping (errors.as_mergeshield_error): a stable code
        _error(as_mergeshield_error(exc))
        return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    settings = Settings()
    if args.command == "scan":
        from mergeshield.cli_commands import run_scan

        return run_scan(args, settings)
    if args.command == "zoo":
        from mergeshield.cli_commands import run_zoo

        return run_zoo(args)
    if args.command == "bv":
        from mergeshield.cli_commands import run_bv

        return run_bv(args, settings)
    if args.command == "merge-plan":
        from mergeshield.cli_commands import run_merge_plan

        return run_merge_plan(args, settings)
    if args.command == "bench" and args.bench_command == "efficacy":
        return efficacy_command.run(args)
    if args.command == "bench":
        from mergeshield.cli_commands import run_bench

        return run_bench(args)
    from mergeshield.cli_commands import run_merge

    return run_merge(args, settings)


def _error(exc: MergeShieldError) -> None:
    if sys.stderr.isatty():
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
    else:  # ascii: a name with a lone surrogate must not fail the error report itself
        print(json.dumps({"error": exc.to_dict()}, default=str), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
