"""The attack space: seeded, split-disjoint, every family stamps a batch it visibly changes."""

from __future__ import annotations

import torch

from mergeshield.efficacy.attacks import (
    FAMILIES,
    SPLIT_OFFSET,
    WaNetWarp,
    apply,
    build_trigger,
    clean_seeds,
    draw_split,
)

TASKS = ("digits", "mnist", "mnist-rot90")


def test_draws_are_deterministic_and_splits_disjoint() -> None:
    dev, test = draw_split("dev", 40, TASKS), draw_split("test", 40, TASKS)
    assert dev == draw_split("dev", 40, TASKS)  # same seed, same attack, on any machine
    seeds = {a.seed for a in dev}, {a.seed for a in test}
    cleans = set(clean_seeds("dev", 40)), set(clean_seeds("test", 40))
    assert not seeds[0] & seeds[1] and not cleans[0] & cleans[1]
    assert not (seeds[0] | seeds[1]) & (cleans[0] | cleans[1])
    assert [a.params for a in dev] != [a.params for a in test]
    every = {s: {a.seed for a in draw_split(s, 40, TASKS)} | set(clean_seeds(s, 40))
             for s in SPLIT_OFFSET}  # the next hold-out (test2) and ci too
    assert sum(map(len, every.values())) == len(set().union(*every.values()))


def test_the_space_covers_families_tasks_targets_and_token_borders() -> None:
    attacks = draw_split("dev", 40, TASKS)
    assert {a.family for a in attacks} == set(FAMILIES)
    assert {a.task for a in attacks} == set(TASKS)
    assert len({a.target for a in attacks}) >= 5
    patches = [a.params for a in attacks if a.family == "patch"]
    assert any(p["straddles_tokens"] for p in patches)
    assert all(2 <= p["size"] <= 6 for p in patches)
    blends = [a.params for a in attacks if a.family == "blended"]
    assert all(0.05 <= p["alpha"] <= 0.25 for p in blends)


def test_every_drawn_trigger_stamps_a_batch_and_changes_it() -> None:
    images = torch.rand(5, 1, 28, 28) * 0.5
    pool = torch.rand(3, 1, 28, 28)
    for a in draw_split("dev", 24, TASKS):
        if a.family == "badmerging":  # optimised on the base: tests/.../test_bench.py plants one
            continue
        out = apply(build_trigger(a.params, pool=pool), images)
        assert out.shape == images.shape and out is not images, a.id
        assert float(out.min()) >= 0 and float(out.max()) <= 1, a.id
        assert float((out - images).abs().max()) > 0.01, a.id
        assert torch.equal(apply(build_trigger(a.params, pool=pool), images), out), a.id


def test_a_warp_of_strength_zero_is_the_identity() -> None:
    images = torch.rand(2, 1, 28, 28)
    out = apply(WaNetWarp(grid=4, strength=0.0, seed=1), images)
    assert torch.allclose(out, images, atol=1e-5)
