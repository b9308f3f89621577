"""cascade/ranking_metrics.py means what the field means: on random runs (rankings with repeats, short rankings,
graded judgements) every metric equals trec_eval's, computed by `ir-measures`; and the one rule for duplicates and
missing values holds."""

from __future__ import annotations

import math

import ir_measures
import numpy as np
import pytest
from ir_measures import P, R, Success, nDCG

from cascade.ranking_metrics import (
    agreement_at_k,
    distinct_top_k,
    hit_at_k,
    mean_over_queries,
    median,
    ndcg_at_k,
    percentile,
    recall_at_k,
    relevant_items,
    wilson_interval,
)

KS = (1, 3, 5, 10)


def _random_query(rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Grades (0..3, many zeros) of K items and a ranking drawn with replacement: repeats and short rankings."""
    items = int(rng.integers(3, 40))
    grades = rng.integers(0, 4, size=items) * (rng.random(items) < 0.4)
    ranking = rng.integers(0, items, size=int(rng.integers(1, items + 6))).tolist()
    return grades, ranking


def _trec(measure, qrels: dict[int, int], ranking: list[int]) -> float:
    """One query through trec_eval (pytrec_eval, via ir-measures): the run is the ranking's distinct ids in order
    of first appearance, scored descending (trec_eval's runs have no repeats: our rule maps onto them)."""
    distinct = list(dict.fromkeys(ranking))
    judged = [ir_measures.Qrel("q", str(i), int(g)) for i, g in qrels.items()]
    run = [ir_measures.ScoredDoc("q", str(d), float(len(distinct) - r)) for r, d in enumerate(distinct)]
    values = [m.value for m in ir_measures.iter_calc([measure], judged, run)]
    assert len(values) == 1
    return float(values[0])


@pytest.mark.parametrize("seed", range(4))
def test_recall_hit_and_graded_ndcg_equal_trec_eval_on_random_runs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(60):
        grades, ranking = _random_query(rng)
        relevant = {int(i) for i in np.flatnonzero(grades > 0)}
        qrels = {i: int(g) for i, g in enumerate(grades)}
        for k in KS:
            if not relevant:  # undefined: NaN, never 0 (trec_eval skips such queries)
                assert math.isnan(recall_at_k(ranking, relevant, k))
                assert math.isnan(hit_at_k(ranking, relevant, k))
                assert math.isnan(ndcg_at_k(ranking, grades, k))
                continue
            # recall@k = hits / min(k, R): trec_eval's P@k when R >= k, its R@k when R < k
            expected = _trec(P @ k if len(relevant) >= k else R @ k, qrels, ranking)
            assert recall_at_k(ranking, relevant, k) == pytest.approx(expected, abs=1e-12)
            assert hit_at_k(ranking, relevant, k) == _trec(Success @ k, qrels, ranking)
            assert ndcg_at_k(ranking, grades, k) == pytest.approx(_trec(nDCG @ k, qrels, ranking), abs=1e-9)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("seed", range(2))
def test_agreement_is_recall_of_the_reference_top_k_as_trec_eval_counts_it(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for _ in range(80):
        _, ranking = _random_query(rng)
        _, reference = _random_query(rng)
        for k in KS:
            top = distinct_top_k(reference, k)
            expected = _trec(R @ k, dict.fromkeys(top, 1), ranking)
            assert agreement_at_k(ranking, reference, k) == pytest.approx(expected, abs=1e-12)


def test_metrics_by_hand() -> None:
    relevant = relevant_items(np.array([1, 0, 1, 1, 0]), 1)  # items 0, 2, 3
    assert recall_at_k([0, 1, 2, 3, 4], relevant, 5) == 1.0
    assert recall_at_k([0, 1, 2, 3, 4], relevant, 2) == 0.5
    assert ndcg_at_k([0, 1], np.ones(5), 2) == pytest.approx(1.0)
    assert ndcg_at_k([0, 1], np.array([0, 1, 1, 1, 1, 1.0]), 2) == pytest.approx(
        (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    )
    assert agreement_at_k([1, 2, 3], [3, 4, 1], 3) == pytest.approx(2 / 3)


def test_a_repeated_id_counts_at_its_first_place_only() -> None:
    assert distinct_top_k([4, 4, 2, 4, 7, 2, 9], 3) == [4, 2, 7]
    assert recall_at_k([2, 2, 2], {2, 3}, 3) == 0.5  # the repeats add nothing
    assert recall_at_k([5, 5, 2], {2}, 2) == 1.0  # ... and take no place: 2 is the second distinct id
    gains = np.array([0.0, 1.0, 3.0])
    assert ndcg_at_k([2, 2, 1], gains, 2) == pytest.approx(1.0)
    assert agreement_at_k([1, 1, 1], [1, 2], 2) == 0.5


def test_short_rankings_are_not_padded_and_undefined_values_are_nan() -> None:
    assert recall_at_k([], {1}, 5) == 0.0
    assert recall_at_k([1], {1, 2, 3}, 5) == pytest.approx(1 / 3)
    assert math.isnan(recall_at_k([1, 2], set(), 2))
    assert math.isnan(ndcg_at_k([0, 1], np.zeros(3), 2))
    assert math.isnan(agreement_at_k([1], [], 3))
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k([1], {1}, 0)
    with pytest.raises(ValueError, match="non-negative"):
        ndcg_at_k([0], np.array([-1.0, 1.0]), 1)


def test_means_and_percentiles_skip_nan_and_are_nan_when_nothing_is_defined() -> None:
    assert mean_over_queries([1.0, math.nan, 0.0]) == 0.5
    assert math.isnan(mean_over_queries([math.nan]))
    assert math.isnan(percentile([], 50)) and math.isnan(median([math.nan]))
    rng = np.random.default_rng(7)
    for size in (1, 2, 5, 100):
        values = rng.normal(size=size)
        with_gaps = [*values.tolist(), math.nan]
        for q in (0, 10, 50, 90, 99, 100):
            assert percentile(with_gaps, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
        assert median(values) == pytest.approx(float(np.median(values)), abs=1e-12)
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_wilson_interval_holds_its_estimate_and_stays_in_zero_one() -> None:
    for trials in (1, 7, 100):
        for successes in range(0, trials + 1, max(1, trials // 7)):
            low, high = wilson_interval(successes, trials)
            assert 0.0 <= low <= successes / trials <= high <= 1.0
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_relevant_items_are_those_with_the_label() -> None:
    assert relevant_items(np.array([0, 1, 1, 2, 1]), 1) == {1, 2, 4}
    assert relevant_items(np.array([0, 1]), 5) == set()


def test_best_within_budget_takes_the_best_affordable_point_and_breaks_ties_in_order() -> None:
    from cascade.ranking_metrics import best_within_budget

    costs = [5.0, 1.0, 3.0, 2.0, 9.0]
    assert best_within_budget(costs, [0.9, 0.5, 0.7, 0.7, 1.0], 4.0) == 2  # 0.7 twice: the first one
    assert best_within_budget(costs, [(0.7, 0.1), (0.5, 0.0), (0.7, 0.1), (0.7, 0.3), (1.0, 0.0)], 4.0) == 3
    assert best_within_budget(costs, [0.9, math.nan, 0.7, 0.7, 1.0], 1.5) is None  # only a NaN is affordable
    assert best_within_budget(costs, [0.9, 0.5, 0.7, 0.7, 1.0], 0.5) is None
    with pytest.raises(ValueError, match="same length"):
        best_within_budget(costs, [0.1], 1.0)
