"""`lab/carry.py` (measured by `benchmarks/bench_carry.py`) runs its own copy of the engine's stage loop to carry
evidence between stages: without carrying it must answer exactly as `run_cascade` (else its comparison means
nothing), a carried stage must score a member the previous stage did not, and shapes it cannot carry are refused."""

from __future__ import annotations

import numpy as np
import pytest

from cascade.config import Stage
from cascade.plan import run_cascade, target_from_label
from lab.carry import CarrySetting, other_member, run_carrying

STAGES = (
    {"variant": "cnn-m20", "samples": 1, "keep": 40},
    {"variant": "cnn-s50", "samples": 1, "keep": 20},
    {"variant": "dense", "samples": 3},
)


@pytest.mark.parametrize("seed", [0, 1])
def test_without_carrying_the_loop_answers_as_the_engine(snapshot, seed: int) -> None:
    setting = CarrySetting("plain", STAGES, (False, False, False))
    for label in (1, 3):
        ids, flops, stage_ms = run_carrying(snapshot, target_from_label(snapshot, label), 5, setting, seed)
        stages = tuple(Stage(**s) for s in STAGES)
        engine = run_cascade(snapshot, target_from_label(snapshot, label), 5, stages, seed)
        assert np.array_equal(ids, engine.cluster_ids)
        assert flops == engine.flops and len(stage_ms) == 3


def test_the_carried_member_is_another_one() -> None:
    sizes = np.array([1, 2, 10, 3, 7])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    clusters = np.arange(len(sizes))
    rng = np.random.default_rng(0)
    for _ in range(200):
        previous = offsets[:-1] + (rng.random(len(sizes)) * sizes).astype(np.int64)
        picked = other_member(offsets, clusters, previous, rng)
        assert np.all((picked >= offsets[:-1]) & (picked < offsets[1:]))  # a member of its own cluster
        assert np.all((picked != previous) | (sizes == 1))  # another one, unless there is no other


def test_a_carried_stage_needs_one_sample_on_both_sides(snapshot) -> None:
    carried = CarrySetting("carried", STAGES, (False, True, False))
    ids, _, _ = run_carrying(snapshot, target_from_label(snapshot, 3), 5, carried, 0)
    assert len(set(ids.tolist())) == 5
    two_first = CarrySetting("bad", ({**STAGES[0], "samples": 2}, *STAGES[1:]), (False, True, False))
    with pytest.raises(ValueError, match="carried stage"):
        run_carrying(snapshot, target_from_label(snapshot, 3), 5, two_first, 0)


def test_a_setting_side_by_side_answers_as_the_loop(snapshot) -> None:
    from cascade.side_by_side import HeldOutQuery, side_by_side
    from lab.carry import carry_method

    carried = CarrySetting("carried", STAGES, (False, True, False))
    query = HeldOutQuery("label 3", lambda s: target_from_label(s, 3))
    rounds = side_by_side(snapshot, [query], [carry_method("carried", carried)], 5, (0, 1))
    for r in rounds:
        ids, flops, stage_ms = run_carrying(snapshot, target_from_label(snapshot, 3), 5, carried, r.seed)
        assert np.array_equal(r["carried"].cluster_ids, ids) and r["carried"].flops == flops
        assert len(r["carried"].stage_ms) == len(stage_ms) and r["carried"].flops_dense_kernel is None
