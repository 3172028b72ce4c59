"""Shards journal their cases; a resumed run collects every shard's and computes nothing twice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mergeshield.efficacy.attacks import Attack
from mergeshield.efficacy.bench import Bench, BenchConfig


def _bench(cfg: BenchConfig, calls: list[str]) -> Bench:
    bench = Bench.__new__(Bench)  # no zoo: the cases are stubs, the journal is real
    bench.cfg, bench.say, bench.defences, bench.alias = cfg, lambda _s, _f: None, [], {}
    bench.world = SimpleNamespace(tasks=("digits", "mnist"))  # type: ignore[assignment]

    def attack_case(attack: Attack) -> dict[str, Any]:
        calls.append(attack.id)
        return {"planted": attack.index != 1, "attack": attack.to_json()}

    def clean_case(index: int, seed: int) -> dict[str, Any]:
        calls.append(f"clean-{index}")
        return {"index": index, "seed": seed}

    bench.attack_case = attack_case  # type: ignore[method-assign]
    bench.clean_case = clean_case  # type: ignore[method-assign]
    return bench


def test_shards_then_resume(tmp_path: Path) -> None:
    cfg = BenchConfig(zoo=tmp_path, work=tmp_path / "work", split="ci", attacks=3, clean=3,
                      dam=None)
    calls: list[str] = []
    for shard in ((0, 2), (1, 2)):
        _bench(replace(cfg, shard=shard), calls).run_shard(*shard)
    assert len(calls) == len(set(calls))  # the shards never share a case
    assert {p.name for p in cfg.work.iterdir()} == {"cases-0.jsonl", "cases-1.jsonl"}
    before = len(calls)
    result = _bench(replace(cfg, resume=True), calls).run()
    planted = [r for r in result["attacks"] if r["planted"]]
    assert len(planted) == 3 and len(result["clean"]) == 3
    assert [r["attack"]["index"] for r in result["attacks"]] == [0, 1, 2, 3]
    assert len(calls) - before <= 1  # at most what no shard drew


def test_a_bad_shard_is_refused() -> None:
    from mergeshield.efficacy.command import _shard

    assert _shard("1/2") == (1, 2)
    with pytest.raises(SystemExit):
        _shard("2/2")
