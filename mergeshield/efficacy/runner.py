"""``mergeshield bench efficacy``: run one split and write its files under ``docs/efficacy/``.

Writes ``<split>.md`` (tables), ``cut-vs-cost-<split>.png`` and ``results.json`` (one key per
split; the other split's earlier results are kept), and returns what it wrote.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from mergeshield import __version__
from mergeshield.efficacy import metrics, report
from mergeshield.efficacy.bench import Bench, BenchConfig, Progress
from mergeshield.efficacy.defences import pinned_off
from mergeshield.pipeline import ScanRequest


def run_efficacy(cfg: BenchConfig, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = Bench(cfg, progress).run()
    wall = time.perf_counter() - t0
    summary = metrics.summarise(result, cfg.merge_methods)
    # a resumed run collects cases other processes (shards) computed: their own seconds add up
    case_seconds = sum(r.get("seconds", r.get("plant_seconds", 0.0))
                       for r in result["attacks"] + result["clean"])
    meta = {"wall_seconds": round(wall, 1), "case_seconds": round(case_seconds, 1),
            "machine": f"{platform.machine()} "
            f"{platform.processor() or platform.system()}", "torch_threads":
            torch.get_num_threads(), "zoo": str(cfg.zoo), "scanner_version": __version__,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "drawn": len(result["attacks"]), "planted": sum(r["planted"]
                                                            for r in result["attacks"]),
            "clean": len(result["clean"]), "min_asr": cfg.min_asr,
            "merge_lambda": cfg.merge_lambda, "ties_keep": cfg.ties_keep,
            "ties_scale": cfg.ties_scale,
            "family": cfg.world.family, "defender_images": cfg.world.defender_images,
            "families": list(cfg.families),
            # what "product" meant for this run: the ScanRequest defaults when it ran, with the
            # run's --scan overrides
            "product_request": ScanRequest(suspect="", base="", **cfg.scan_overrides).model_dump(
                mode="json", exclude={"suspect", "base"}),
            "pinned_off": {k: str(v) for k, v in pinned_off().items()}}
    out.mkdir(parents=True, exist_ok=True)
    page = out / f"{cfg.label}.md"
    page.write_text(report.markdown(cfg.label, summary, cfg.merge_methods, meta))
    png = out / f"cut-vs-cost-{cfg.label}.png"
    report.plot(summary, cfg.merge_methods, png,
                f"{cfg.label} split: {meta['planted']} attacks, {meta['clean']} clean")
    path = out / "results.json"
    stored: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    stored[cfg.label] = {"meta": meta, "summary": summary, "cases": result}
    path.write_text(json.dumps(stored, indent=1))
    return {"files": [page.name, png.name, path.name], "summary": summary, "meta": meta}
