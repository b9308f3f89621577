"""The side-by-side harness answers each method exactly as the service would (the plan, executed with the round's
seed), beside the dense oracle, on the same target; rounds cover every (seed, query) and every method."""

from __future__ import annotations

import numpy as np
import pytest

from cascade.config import Stage
from cascade.engine import dense_oracle
from cascade.evaluation import evaluate_example_queries, example_queries, label_queries
from cascade.exact import build_table
from cascade.plan import execute, plan_target, target_from_examples, target_from_label
from cascade.side_by_side import ORACLE, HeldOutQuery, Method, exact, records_of, side_by_side, stages

CHEAP = (Stage(variant="cnn-m20", samples=1, keep=20), Stage(variant="dense", samples=3))


def test_each_method_answers_as_its_plan_executed_with_the_rounds_seed(snapshot) -> None:
    queries = label_queries(snapshot)[:3]
    methods = [stages("default", None), stages("cheap", CHEAP)]
    rounds = side_by_side(snapshot, queries, methods, 5, seeds=(0, 4))
    assert [(r.seed, r.query.name) for r in rounds] == [(s, q.name) for s in (0, 4) for q in queries]
    for r in rounds:
        assert set(r.records) == {"default", "cheap", "oracle"}
        target = target_from_label(snapshot, r.query.info["label"])
        for name, chosen in (("default", None), ("cheap", CHEAP)):
            direct = execute(plan_target(snapshot, target, 5, chosen), r.seed)
            assert np.array_equal(r[name].cluster_ids, direct.cluster_ids)
            assert r[name].flops == direct.flops and len(r[name].stage_ms) == len(direct.stages)
        assert np.array_equal(r["oracle"].cluster_ids, dense_oracle(snapshot, target, 5).cluster_ids)
        assert all(rec.ms > 0 for rec in r.records.values())
    assert len(records_of(rounds, "cheap")) == len(rounds)


def test_the_exact_table_is_a_method_like_any_other(snapshot) -> None:
    table = build_table(snapshot, progress=False)
    rounds = side_by_side(snapshot, label_queries(snapshot)[:2], [exact("exact", table)], 4, reference=ORACLE)
    for r in rounds:
        assert set(r["exact"].cluster_ids.tolist()) == set(r["oracle"].cluster_ids.tolist())
        assert r["exact"].stage_ms == ()


def test_shuffled_warm_and_per_query_seeds() -> None:
    calls: list[tuple[str, int]] = []

    class Answer:
        def __init__(self, name: str) -> None:
            self.cluster_ids, self.flops, self.flops_dense_kernel = np.array([1, 2]), 7, 9

    def run_as(name: str) -> Method:
        def run(snapshot, target, k, seed):
            calls.append((name, seed))
            return Answer(name)

        return Method(name, run=run)

    class Target:
        candidates, flops = None, 3

    queries = [HeldOutQuery(f"q{i}", lambda snap: Target()) for i in range(3)]
    methods = [run_as(n) for n in "abcd"]
    rounds = side_by_side(
        None, queries, methods, 2, (10,), reference=None, shuffle=np.random.default_rng(1), warm=2, seed_per_query=True
    )
    assert [r.seed for r in rounds] == [10, 11, 12]
    orders = [[name for name, _ in calls[i * 12 : (i + 1) * 12 : 3]] for i in range(3)]
    assert all(sorted(o) == list("abcd") for o in orders) and len({tuple(o) for o in orders}) > 1  # shuffled
    assert len(calls) == 3 * 4 * 3  # every method once, then twice warm
    rec = rounds[0]["a"]
    assert rec.flops == 7 + 3 and rec.flops_dense_kernel == 9 + 3  # the target's own FLOPs count for it
    assert rec.ms_warm is not None and rec.stage_ms == ()


def test_method_names_are_distinct_and_a_method_is_a_plan_or_a_run(snapshot) -> None:
    with pytest.raises(ValueError, match="exactly one of plan and run"):
        Method("nothing")
    with pytest.raises(ValueError, match="distinct"):
        side_by_side(snapshot, label_queries(snapshot)[:1], [stages("oracle", None)], 3)


def test_example_queries_side_by_side_score_what_each_plan_answers(snapshot) -> None:
    methods = {"faiss only": [], "default": None}
    reports = evaluate_example_queries(snapshot, methods, k=5, candidates=30, queries=4, seed=3)
    assert set(reports) == {"faiss only", "default", "oracle"} and all(r.queries == 4 for r in reports.values())
    assert reports["faiss only"].flops < reports["default"].flops < reports["oracle"].flops
    held_out = example_queries(snapshot, 30, 4)
    rounds = side_by_side(snapshot, held_out, [stages("default", None)], 10, (3,), seed_per_query=True)
    for i, r in enumerate(rounds):
        target = target_from_examples(snapshot, snapshot.queries.x[i : i + 1], 30)
        direct = execute(plan_target(snapshot, target, 10, None), 3 + i)
        assert np.array_equal(r["default"].cluster_ids, direct.cluster_ids)
        assert r["default"].flops == direct.flops + target.flops and r["oracle"].flops == r["oracle"].answer.flops
