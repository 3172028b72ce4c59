"""The runner writes tables, plots and a results.json whose every rate names its denominator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mergeshield.cli import build_parser
from mergeshield.errors import ConfigError
from mergeshield.experiments.bv_arithmetic import ArithmeticConfig
from mergeshield.experiments.bv_similarity import SimilarityConfig
from mergeshield.experiments.runner import PaperConfig, run_paper
from mergeshield.report.schema import RateModel
from mergeshield.training import FinetuneConfig
from tests.support.zoo import Zoo


def _rates(node: Any) -> list[dict[str, Any]]:
    """Every JSON object that carries a rate."""
    if isinstance(node, dict):
        own = [node] if "rate" in node else []
        return own + [r for v in node.values() for r in _rates(v)]
    if isinstance(node, list):
        return [r for v in node for r in _rates(v)]
    return []


def test_runner_writes_markdown_png_and_valid_json(zoo: Zoo, tmp_path: Path) -> None:
    cfg = PaperConfig(
        out=tmp_path, zoo=zoo.root, quick=True, only=(1, 2),
        arithmetic=ArithmeticConfig(lambdas=(0.0, 1.0), models=("vit-mnist-badnets",),
                                    max_eval=200),
        similarity=SimilarityConfig(full_grid=False, max_eval=200,
                                    finetune=FinetuneConfig(epochs=1, lr=1e-3)),
    )
    results = run_paper(cfg)
    for name in ("bv-arithmetic.md", "bv-arithmetic-vit.png", "bv-similarity.md",
                 "bv-similarity-cosine.png", "bv-similarity-transfer.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
        assert name in results["files"]
    assert (tmp_path / "bv-arithmetic-vit.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "results.json").read_text())
    rates = _rates(data)
    assert len(rates) > 20
    for r in rates:
        RateModel.model_validate(r)  # hits, total, rate and ci95, consistent
        assert 0 <= r["hits"] <= r["total"]
    assert data["run"]["seed"] == 0 and data["zoo"]["config"]["finetune"]["epochs"] > 0
    assert data["experiments"]["bv-arithmetic"]["config"]["lambdas"] == [0.0, 1.0]
    sim = data["experiments"]["bv-similarity"]
    assert len(sim["bvs"]) == 5 and len(sim["transfer"]) == 5
    assert "| model | attack |" in (tmp_path / "bv-arithmetic.md").read_text()
    held = {c["id"]: c["held"] for c in data["claims"]}  # the quick claims of experiment 1
    assert held["injection"] is True and held["transplant"] is True
    assert held["accuracy-kept"] is True and held["detection-auc"] is None  # 6 did not run
    assert (tmp_path / "claims.md").is_file()


def test_unknown_experiment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no experiment"):
        run_paper(PaperConfig(out=tmp_path, only=(7,)))


def test_cli_parses_bench_paper() -> None:
    args = build_parser().parse_args(["bench", "paper", "--out", "x", "--quick", "--only", "1"])
    assert (args.command, args.bench_command, args.quick, args.only) == ("bench", "paper",
                                                                        True, [1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_scale_without_cuda_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        run_paper(PaperConfig(out=tmp_path, scale="gpu"))
    with pytest.raises(ConfigError, match="leave out --quick"):
        run_paper(PaperConfig(out=tmp_path, scale="gpu", quick=True))
