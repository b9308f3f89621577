"""The cascade engine on a tiny bootstrapped space."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cascade.config import Stage
from cascade.costs import dense_flops
from cascade.engine import ORACLE_AGGREGATOR, dense_oracle
from cascade.errors import RequestError
from cascade.evaluation import evaluate_label_queries
from cascade.plan import run_cascade, target_from_label
from cascade.snapshot import Snapshot
from cascade.space import build_space


def test_label_queries_find_clusters_of_that_label(snapshot) -> None:
    """Clusters are views of one prototype, so a classifier that misreads a prototype misreads all its views:
    the cascade is held to the precision of its own last stage run on every member of every cluster (what its
    pruning and sampling may lose), and that exhaustive stage and the oracle to a floor. The oracle aggregates
    by `ORACLE_AGGREGATOR`, not the cascade's aggregator, so how far the two rankings differ is the aggregators'
    (docs/aggregation.md), not the cascade's."""
    space = snapshot.space
    last = snapshot.config.stages[-1]
    exhaustive = [last.model_copy(update={"samples": int(space.sizes.max()), "keep": None})]
    oracle_precision, exhaustive_precision = [], []
    for label in range(space.num_classes):
        target = target_from_label(snapshot, label)
        result = run_cascade(snapshot, target, k=10, seed=label)
        oracle = (space.cluster_labels[dense_oracle(snapshot, target, 10).cluster_ids] == label).mean()
        oracle_precision.append(oracle)
        reference = run_cascade(snapshot, target, 10, exhaustive, seed=label)
        assert reference.stages[0].items == space.num_items  # every member of every cluster
        best = int((space.cluster_labels[reference.cluster_ids] == label).sum())
        exhaustive_precision.append(best / 10)
        hits = int((space.cluster_labels[result.cluster_ids] == label).sum())
        assert hits >= best - 1  # at most one of the ten fewer than the exhaustive last stage
        assert result.flops == sum(s.flops for s in result.stages)
        assert len(result.cluster_ids) == len(set(result.cluster_ids.tolist())) == 10
        assert np.all(np.diff(result.scores) <= 1e-9)  # best first (p(label) is monotone in the log-odds)
    assert np.mean(oracle_precision) >= 0.85 and np.mean(exhaustive_precision) >= 0.85


def test_stage_accounting(snapshot) -> None:
    result = run_cascade(snapshot, target_from_label(snapshot, 3), k=5)
    first, last = result.stages
    assert first.clusters_in == snapshot.space.num_clusters and first.kept == 40
    assert last.clusters_in == 40 and last.kept == 5
    assert first.items == int(np.minimum(snapshot.space.sizes, 2).sum())
    variant = snapshot.variants[first.variant]
    assert first.flops == first.items * variant.flops.nonzero + first.items * snapshot.space.num_classes


def test_same_seed_same_answer_and_seeds_matter(snapshot) -> None:
    t = target_from_label(snapshot, 1)
    a = run_cascade(snapshot, t, k=10, seed=7)
    b = run_cascade(snapshot, t, k=10, seed=7)
    np.testing.assert_array_equal(a.cluster_ids, b.cluster_ids)
    stages = [Stage(variant="cnn-m20", samples=1, keep=20), Stage(variant="dense", samples=1)]
    answers = {tuple(run_cascade(snapshot, t, 10, stages, seed=s).cluster_ids.tolist()) for s in range(5)}
    assert len(answers) > 1


def test_oracle_is_a_single_dense_stage_over_all_members(snapshot) -> None:
    t = target_from_label(snapshot, 2)
    oracle = dense_oracle(snapshot, t, k=10)
    every = int(snapshot.space.sizes.max())
    one_stage = run_cascade(snapshot, t, 10, [Stage(variant="dense", samples=every, aggregator=ORACLE_AGGREGATOR)])
    np.testing.assert_allclose(np.sort(oracle.scores), np.sort(one_stage.scores), rtol=1e-5)
    assert oracle.flops == dense_flops(snapshot, t) == one_stage.stages[0].items * snapshot.dense.flops.nonzero


@pytest.mark.parametrize(
    ("stages", "k", "field"),
    [
        ([Stage(variant="nope", samples=2)], 5, "stages[0].variant"),
        ([Stage(variant="dense", samples=2, keep=3), Stage(variant="dense", samples=2)], 5, "stages[0].keep"),
        ([Stage(variant="dense", samples=2), Stage(variant="dense", samples=2)], 5, "stages[0].keep"),
        ([Stage(variant="dense", samples=2, aggregator="median")], 5, "stages[0].aggregator"),
        (None, 10**6, "k"),
        (None, 0, "k"),
    ],
)
def test_invalid_cascades_name_the_field(snapshot, stages, k, field) -> None:
    with pytest.raises(RequestError) as info:
        run_cascade(snapshot, target_from_label(snapshot, 0), k, stages)
    assert info.value.field == field


def test_evaluation_report_is_consistent(snapshot) -> None:
    r = evaluate_label_queries(snapshot, k=5, seeds=(0,))
    assert r.queries == snapshot.space.num_classes
    assert r.oracle_recall >= 0.95 and r.recall >= 0.9
    assert r.flops < r.oracle_flops and r.flops_ratio > 1


def test_ranking_separates_clusters_whose_posteriors_saturate() -> None:
    from cascade.target import Target, ranking_key

    # both clusters have p(label 0) == 1.0 in float64; the second is far surer than the first
    log_post = torch.tensor([[0.0, -40.0, -40.0], [0.0, -90.0, -95.0]], dtype=torch.float64)
    assert log_post.exp()[0, 0] == log_post.exp()[1, 0] == 1.0
    key = ranking_key(log_post, Target(utility=np.array([1.0, 0.0, 0.0]), label=0))
    assert key[1] > key[0]
    # a utility target ranks by expected utility
    key = ranking_key(log_post.log_softmax(1), Target(utility=np.array([0.0, 1.0, 0.0])))
    assert key[0] > key[1]


def test_utility_log_odds_rank_as_the_expected_utility_and_break_saturated_ties() -> None:
    from cascade.target import Target, ranking_key

    lp = (3 * torch.randn(300, 4, generator=torch.Generator().manual_seed(0))).double().log_softmax(1)
    u = np.array([0.0, 1.0, 3.0, 0.5])
    key = ranking_key(lp, Target(utility=u))
    expected = lp.exp() @ torch.from_numpy(u)
    assert torch.equal(torch.argsort(key, descending=True), torch.argsort(expected, descending=True))
    saturated = torch.tensor([[-40.0, -45.0, 0.0, -50.0], [-90.0, -95.0, 0.0, -99.0]], dtype=torch.float64)
    assert (saturated.exp() @ torch.from_numpy(u)).unique().tolist() == [3.0]  # a tie in expected utility
    key = ranking_key(saturated, Target(utility=u))
    assert key[1] > key[0]  # the surer cluster first


def test_a_passed_deadline_stops_the_cascade_before_the_next_stage(snapshot) -> None:
    import time

    from cascade.engine import DeadlineExceeded

    target = target_from_label(snapshot, 1)
    with pytest.raises(DeadlineExceeded, match="stage 0"):
        run_cascade(snapshot, target, 5, deadline=time.monotonic() - 1.0)
    assert len(run_cascade(snapshot, target, 5, deadline=time.monotonic() + 60.0).cluster_ids) == 5


def _cluster_repeated(snapshot: Snapshot, cluster: int, times: int) -> Snapshot:
    """The same space, with every member of `cluster` present `times` times (a bigger cluster of the same items)."""
    space = snapshot.space
    start, stop = int(space.offsets[cluster]), int(space.offsets[cluster + 1])
    extra = np.repeat(np.arange(start, stop), times - 1)
    rows = np.concatenate([np.arange(space.num_items), extra])
    ids = np.repeat(np.arange(space.num_clusters), space.sizes)
    bigger = build_space(space.features[rows], space.labels[rows], space.prior, ids[rows], dict(space.meta))
    return dataclasses.replace(snapshot, space=bigger, features=torch.from_numpy(bigger.features))


def test_the_oracle_does_not_rank_a_cluster_higher_for_being_bigger(snapshot: Snapshot) -> None:
    """Repeating a cluster's members changes nothing it knows about the query, so the oracle's
    ranking value of that cluster must not move (the sum of log posteriors, `bayes`, grew with the repeats)."""
    target = target_from_label(snapshot, int(snapshot.space.cluster_labels[3]))
    bigger = _cluster_repeated(snapshot, 3, times=8)
    everything = snapshot.space.num_clusters

    def values(snap: Snapshot) -> np.ndarray:
        result = dense_oracle(snap, target, everything)
        out = np.empty(everything)
        out[result.cluster_ids] = result.ranking_values
        return out

    np.testing.assert_allclose(values(bigger), values(snapshot), rtol=1e-5, atol=1e-5)
    stage = [Stage(variant="dense", samples=int(bigger.space.sizes.max()), aggregator="bayes")]
    summed = run_cascade(bigger, target, everything, stage)
    moved = summed.ranking_values[summed.cluster_ids == 3][0]
    assert abs(moved - values(snapshot)[3]) > 1e-3  # the same check catches `bayes` over every member
