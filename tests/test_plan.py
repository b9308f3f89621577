"""The query plan on the tiny home: each path (exact table, cascade, FAISS only) is planned once and executed,
and what the plan says a query costs is what its execution reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cascade.plan as plan_module
from cascade.config import CONFIG_FILE, CascadeConfig, Stage
from cascade.costs import dense_flops
from cascade.engine import CascadeResult
from cascade.errors import ExactTableNotReady, RequestError
from cascade.exact import ExactAnswer, ExactTable, build_table
from cascade.plan import Limits, Query, execute, plan_query
from cascade.snapshot import Snapshot, load_snapshot
from models.registry import ModelRegistry


@pytest.fixture(scope="module")
def table(snapshot: Snapshot) -> ExactTable:
    return build_table(snapshot)


def _examples(snapshot: Snapshot, i: int) -> list[list[float]]:
    assert snapshot.queries is not None
    return snapshot.queries.x[i : i + 1].tolist()


def _classifier_stages(snapshot: Snapshot, samples: int) -> list[Stage]:
    cheap = snapshot.config.stages[0].variant
    return [Stage(variant=cheap, samples=samples, keep=20), Stage(variant=snapshot.config.dense, samples=samples)]


def test_exact_path_is_a_lookup_and_costs_what_the_plan_says(snapshot: Snapshot, table: ExactTable) -> None:
    label = snapshot.space.labels_known[2]
    plan = plan_query(snapshot, Query(label=label, k=7, mode="exact"), exact_table=lambda _: table)
    assert (plan.path, plan.stages, plan.stage_flops, plan.table) == ("exact", (), (), table)
    result = execute(plan, seed=5)
    assert isinstance(result, ExactAnswer)
    assert plan.flops == result.flops == 2 * snapshot.space.num_clusters * snapshot.space.num_classes
    assert plan.dense_flops == dense_flops(snapshot, plan.target)  # read from the table: the same count
    direct = table.answer(plan.target, 7, snapshot.id)
    np.testing.assert_array_equal(result.cluster_ids, direct.cluster_ids)
    # auto takes the table once it is there, the cascade before; mode cascade never takes it
    assert plan_query(snapshot, Query(label=label), exact_table=lambda _: table).path == "exact"
    assert plan_query(snapshot, Query(label=label), exact_table=lambda _: None).path == "cascade"
    assert plan_query(snapshot, Query(label=label, mode="cascade"), exact_table=lambda _: table).path == "cascade"
    with pytest.raises(ExactTableNotReady):
        plan_query(snapshot, Query(label=label, mode="exact"), exact_table=lambda _: None)


def test_label_cascade_costs_what_the_plan_says_stage_by_stage(snapshot: Snapshot) -> None:
    samples = int(min(2, snapshot.space.sizes.min()))  # every cluster has them: the plan is exact
    stages = _classifier_stages(snapshot, samples)
    plan = plan_query(snapshot, Query(label=snapshot.space.labels_known[1], k=5, stages=stages))
    assert plan.path == "cascade" and plan.stages == tuple(stages)
    result = execute(plan, seed=3)
    assert isinstance(result, CascadeResult) and len(result.stages) == 2
    assert plan.stage_flops == tuple(s.flops for s in result.stages)
    assert plan.flops == plan.target.flops + result.flops


def test_default_pair_cascade_costs_at_most_the_plan_and_exactly_where_clusters_are_full(snapshot: Snapshot) -> None:
    exact_stages = 0
    for i in range(5):
        plan = plan_query(snapshot, Query(examples=_examples(snapshot, i), k=5), Limits(example_candidates=40))
        assert plan.path == "cascade" and plan.stages  # the snapshot's pair cascade, keeps scaled to k
        result = execute(plan, seed=i)
        assert isinstance(result, CascadeResult)
        assert len(plan.stage_flops) == len(result.stages)
        for planned, report in zip(plan.stage_flops, result.stages, strict=True):
            assert planned >= report.flops
            if report.items == report.clusters_in * report.samples:  # every cluster had `samples` members
                assert planned == report.flops
                exact_stages += 1
        assert plan.flops >= plan.target.flops + result.flops
    assert exact_stages > 0  # the equality was checked, not only the bound


def test_faiss_only_costs_the_target_alone(snapshot: Snapshot) -> None:
    plan = plan_query(snapshot, Query(examples=_examples(snapshot, 0), k=5, stages=[]))
    assert (plan.path, plan.stages, plan.stage_flops) == ("faiss", (), ())
    result = execute(plan)
    assert isinstance(result, CascadeResult) and result.stages == []
    assert plan.flops == plan.target.flops > 0 and result.flops == 0
    assert result.ranking == "negative_sq_distance"


def test_without_a_pair_model_served_a_query_by_example_is_faiss_alone(tiny_home: Path, snapshot: Snapshot) -> None:
    """As while a first run still trains its pair models (its `cascade.json` has none yet), or with the dense pair
    model broken: the bi-encoder's nearest clusters, the same as the FAISS-only answer of a full snapshot."""
    config = CascadeConfig.load(tiny_home / CONFIG_FILE).model_copy(update={"pair_dense": None, "pair_stages": None})
    bare = load_snapshot(ModelRegistry(tiny_home / "registry"), tiny_home / "spaces" / "default", config)
    assert bare.num_grades == 0 and bare.embedding is not None
    plan = plan_query(bare, Query(examples=_examples(bare, 0), k=5))
    assert (plan.path, plan.stages, plan.dense_flops) == ("faiss", (), 0)
    alone = execute(plan)
    full = execute(plan_query(snapshot, Query(examples=_examples(snapshot, 0), k=5, stages=[])))
    assert isinstance(alone, CascadeResult) and alone.ranking == "negative_sq_distance"
    assert alone.cluster_ids.tolist() == full.cluster_ids.tolist()
    with pytest.raises(RequestError) as err:
        plan_query(bare, Query(examples=_examples(bare, 0), k=5, gains=[0.0, 1.0, 3.0]))
    assert err.value.field == "target.gains"


def test_stages_are_resolved_and_checked_once_per_query(snapshot: Snapshot, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    check = plan_module.check_stages

    def counting(*args: object, **kwargs: object) -> None:
        calls.append(args)
        check(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(plan_module, "check_stages", counting)
    execute(plan_query(snapshot, Query(label=snapshot.space.labels_known[0], k=5, mode="cascade")), seed=1)
    execute(plan_query(snapshot, Query(examples=_examples(snapshot, 1), k=5)), seed=1)
    assert len(calls) == 2


def test_the_budget_is_checked_on_the_plan(snapshot: Snapshot) -> None:
    query = Query(label=snapshot.space.labels_known[0], k=5, mode="cascade")
    cost = plan_query(snapshot, query).flops
    assert plan_query(snapshot, query, Limits(max_flops=cost)).flops == cost
    with pytest.raises(RequestError, match="over the server's budget") as err:
        plan_query(snapshot, query, Limits(max_flops=cost - 1))
    assert err.value.field == "k"  # no stages given: k decides the default cascade's cost
    with pytest.raises(RequestError) as err:
        plan_query(snapshot, Query(label=0, stages=_classifier_stages(snapshot, 1)), Limits(max_flops=1))
    assert err.value.field == "stages"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (Query(label=0, k=11), "k"),  # over max_k
        (Query(label=10**6), "target.label"),
        (Query(label=0, gains=[0, 1, 3]), "target.gains"),
        (Query(label=0, candidates=5), "candidates"),
        (Query(label=0, stages=[]), "stages"),
        (Query(label=0, mode="exact", stages=[Stage(variant="dense", samples=2)]), "mode"),
        (Query(utility=[0.0] * 3), "target.utility"),
    ],
)
def test_a_bad_field_is_a_request_error_naming_it(snapshot: Snapshot, query: Query, field: str) -> None:
    with pytest.raises(RequestError) as err:
        plan_query(snapshot, query, Limits(max_k=10))
    assert err.value.field == field
