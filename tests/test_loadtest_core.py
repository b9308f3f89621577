"""The load tester's pure core: the numbers in its CSV must be right before its plots mean anything."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cascade.ranking_metrics import agreement_at_k, pareto_front, percentile, recall_at_k, sweet_spot
from cascade.ranking_metrics import relevant_items as relevant_clusters
from service.loadtest.evaluate import summarize_configs
from service.loadtest.grid import cascade_label, expand_grid, parse_groups, stages_payload
from service.loadtest.schedule import open_loop_schedule
from service.loadtest.target import check_target, is_loopback_url


def test_percentile_interpolates_between_order_statistics() -> None:
    values = list(range(100, 0, -1))  # unsorted on purpose
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0


def test_percentile_matches_numpy_default_method() -> None:
    rng = np.random.default_rng(3)
    values = rng.exponential(20.0, size=137).tolist()
    for q in (50, 95, 99, 99.9):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_schedule_is_evenly_spaced_and_counted_from_rate_times_duration() -> None:
    assert open_loop_schedule(10, 0.3, 100) == pytest.approx([0.0, 0.1, 0.2])
    offsets = open_loop_schedule(5, 2.0, 100)
    assert len(offsets) == 10
    assert np.diff(offsets) == pytest.approx([0.2] * 9)


def test_schedule_is_bounded_by_max_requests() -> None:
    assert len(open_loop_schedule(1000, 60, 25)) == 25
    assert open_loop_schedule(1000, 60, 0) == []


@pytest.mark.parametrize(("rate", "duration"), [(0, 1), (-1, 1), (5, 0), (math.inf, 1), (5, math.nan)])
def test_schedule_rejects_nonsense(rate: float, duration: float) -> None:
    with pytest.raises(ValueError):
        open_loop_schedule(rate, duration, 10)


def test_recall_divides_by_min_of_k_and_relevant() -> None:
    assert recall_at_k([1, 2, 3], {2, 3, 9}, 3) == pytest.approx(2 / 3)
    assert recall_at_k([2, 3, 1], {2, 3, 9}, 2) == 1.0  # two relevant in the first two: perfect at k=2
    assert recall_at_k([1, 2, 3, 4], {2}, 3) == 1.0  # one relevant cluster exists and is found
    assert recall_at_k([4, 5, 2], {2}, 2) == 0.0  # found, but only at rank 3


def test_recall_counts_a_duplicate_answer_once_and_is_nan_without_relevant() -> None:
    assert recall_at_k([2, 2, 2], {2, 3}, 3) == 0.5
    assert math.isnan(recall_at_k([1, 2], set(), 2))


def test_relevant_clusters_are_those_with_the_label() -> None:
    assert relevant_clusters(np.array([0, 1, 1, 2, 1]), 1) == {1, 2, 4}
    assert relevant_clusters(np.array([0, 1]), 5) == set()


def test_agreement_with_the_oracle_ignores_order_within_top_k() -> None:
    assert agreement_at_k([3, 2, 1], [1, 2, 3], 3) == 1.0
    assert agreement_at_k([1, 2, 7, 8], [1, 2, 3, 4], 4) == 0.5
    assert agreement_at_k([9, 1], [1, 9, 5], 1) == 0.0  # top-1 is 9, the oracle's top-1 is 1


def test_pareto_front_drops_dominated_points_and_sorts_by_cost() -> None:
    costs = [1.0, 2.0, 3.0, 2.0, 4.0]
    quality = [0.5, 0.4, 0.9, 0.6, 0.9]
    # 1 is dominated by 0 (cheaper and better); 4 by 2 (same quality, cheaper)
    assert pareto_front(costs, quality) == [0, 3, 2]


def test_pareto_front_skips_nan_and_keeps_exact_ties() -> None:
    assert pareto_front([1.0, 1.0, math.nan], [0.5, 0.5, 1.0]) == [0, 1]
    with pytest.raises(ValueError):
        pareto_front([1.0], [0.5, 0.6])


def test_sweet_spot_is_the_cheapest_within_tolerance_of_the_best() -> None:
    costs = [1.0, 2.0, 5.0, 10.0]
    quality = [0.50, 0.90, 0.985, 0.99]
    assert sweet_spot(costs, quality, tolerance=0.01) == 2
    assert sweet_spot(costs, quality, tolerance=0.0) == 3
    assert sweet_spot(costs, quality, tolerance=0.1) == 1
    assert sweet_spot([math.nan], [math.nan]) is None


def _row(config: str, rate: float, flops: float, recall: float, errors: int = 0) -> dict[str, object]:
    return {
        "config": config,
        "rate": rate,
        "ok": 10 - errors,
        "sent": 10,
        "errors": errors,
        "flops": flops,
        "recall_at_k": recall,
        "agreement_at_k": recall,
        "p99_ms": 5.0,
    }


def test_sweet_spot_never_goes_to_a_configuration_with_errors() -> None:
    rows = [_row("cheap", 5, 1.0, 0.99, errors=1), _row("mid", 5, 2.0, 0.985), _row("dear", 5, 3.0, 0.5)]
    summaries = {s.config: s for s in summarize_configs(rows, tolerance=0.01)}
    assert summaries["cheap"].pareto  # it is on the front: cheapest and best
    assert not summaries["cheap"].sweet_spot
    assert summaries["mid"].sweet_spot
    assert not summaries["dear"].pareto
    assert [r["sweet_spot"] for r in rows] == [False, True, False]


def test_grid_expands_per_stage_and_drops_invalid_cuts() -> None:
    configs, dropped = expand_grid("a,b/c/dense", "2/4,8/10", "50,5/20/-", "bayes", k=10, max_configs=100)
    # stage 1: 2 variants x 2 keeps; stage 2: 2 samples x keep 20; stage 3: dense keeps k
    assert len(configs) + len(dropped) == 8
    assert len(configs) == 4  # keep=5 < k is dropped for both variants and both stage-2 samples
    assert all(c[0].keep == 50 and c[1].keep == 20 and c[2].keep is None for c in configs)
    assert cascade_label(configs[0]) == "a/2/50 > c/4/20 > dense/10"
    assert stages_payload(configs[0])[2] == {"variant": "dense", "samples": 10, "keep": None, "aggregator": "bayes"}


def test_grid_drops_cuts_that_do_not_shrink_and_refuses_huge_grids() -> None:
    configs, dropped = expand_grid("a/b/dense", "2", "20/40/-", "bayes", k=10, max_configs=10)
    assert configs == [] and "shrink" in dropped[0]
    with pytest.raises(ValueError, match="max-configs"):
        expand_grid("a,b,c/d,e,f", "1,2", "20", "bayes", k=10, max_configs=10)
    with pytest.raises(ValueError):
        expand_grid("a/b", "1/2/3", "20", "bayes", k=10, max_configs=10)
    with pytest.raises(ValueError):
        parse_groups("a,,b")


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://localhost:8000/", True),
        ("http://127.8.0.1", True),
        ("http://[::1]:8000", True),
        ("http://10.0.0.5:8000", False),
        ("https://example.com", False),
        ("http://localhost.example.com", False),
        ("ftp://127.0.0.1", False),
    ],
)
def test_loopback_detection(url: str, loopback: bool) -> None:
    assert is_loopback_url(url) is loopback


def test_remote_targets_need_explicit_permission() -> None:
    with pytest.raises(ValueError, match="allow-remote"):
        check_target("http://10.0.0.5:8000", allow_remote=False)
    check_target("http://10.0.0.5:8000", allow_remote=True)
    with pytest.raises(ValueError):
        check_target("127.0.0.1:8000", allow_remote=True)
