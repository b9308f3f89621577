"""n-accuracy's interval is a Wilson score interval: never outside [0, 1], not degenerate at all or no hits;
RI's interval never goes above 1, the largest value RI can take."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cascade.ranking_metrics import wilson_interval
from lab.metrics import n_accuracy, relative_information


@pytest.mark.parametrize(
    ("hits", "trials", "low", "high"),
    [
        (8, 10, 0.4902, 0.9433),  # tabulated Wilson intervals (95%)
        (0, 10, 0.0, 0.2775),  # upper end z^2 / (n + z^2)
        (10, 10, 0.7225, 1.0),
        (1, 1, 0.2065, 1.0),
    ],
)
def test_wilson_interval_matches_known_values(hits: int, trials: int, low: float, high: float) -> None:
    got = wilson_interval(hits, trials)
    assert got == pytest.approx((low, high), abs=1e-4)


@given(st.integers(1, 100_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_stays_in_the_unit_interval_and_holds_the_estimate(case: tuple[int, int]) -> None:
    hits, trials = case
    low, high = wilson_interval(hits, trials)
    assert 0.0 <= low <= hits / trials <= high <= 1.0
    assert high - low > 0  # never a zero-width interval, even at 0 or n hits


@pytest.mark.parametrize(("hits", "trials"), [(1, 0), (-1, 5), (6, 5)])
def test_wilson_interval_refuses_impossible_counts(hits: int, trials: int) -> None:
    with pytest.raises(ValueError):
        wilson_interval(hits, trials)


def test_near_perfect_n_accuracy_has_an_interval_below_one() -> None:
    """The issue's case: ~99% hits on 2,000 tuples gave [0.9787, 1.0013] with the normal approximation."""
    labels = torch.zeros(2000, dtype=torch.long)
    predicted = torch.zeros(2000, dtype=torch.long)
    predicted[:20] = 1
    post = torch.nn.functional.one_hot(predicted, 3).float().log_softmax(1)
    est = n_accuracy(post, labels)
    assert est.value == pytest.approx(0.99)
    assert 0.98 < est.low < 0.99 < est.high < 1.0
    all_right = n_accuracy(torch.nn.functional.one_hot(labels, 3).float().log_softmax(1), labels)
    assert all_right.value == 1.0 and all_right.high == 1.0 and all_right.low < 1.0


def test_relative_information_interval_never_exceeds_one() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (50,), generator=g)
    confident = (torch.nn.functional.one_hot(labels, 4).float() * 30).log_softmax(1)
    confident[0] = torch.tensor([0.25, 0.25, 0.25, 0.25]).log()  # one tuple at the prior: a spread of values
    prior = torch.full((4,), 0.25)
    est = relative_information(confident, labels, prior)
    assert est.value < 1.0 and est.high == 1.0  # the normal interval would have reached above 1
    values = 1.0 - (-confident.gather(1, labels[:, None]).squeeze(1).double()) / math.log(4)
    normal_high = est.value + 1.959963984540054 * float(values.std()) / math.sqrt(50)
    assert normal_high > 1.0  # so the cut did something
    assert math.isfinite(est.low) and est.low < est.value
