"""Aggregators and shared-label metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aggregation_fixtures import digits_mlp, digits_splits

from lab.metrics import TupleMetrics, n_accuracy, relative_information
from models.aggregation import (
    MemberOutputs,
    aggregate,
    aggregate_many,
    get_aggregator,
    list_aggregators,
    log_mean_posteriors,
    log_prior_of,
)

AVERAGING = ("mean_prob", "mean_logit", "bayes")


def _independent_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Members are symbols s_i drawn independently given y from a table L[y, s]; each member's output is its exact
    single-item posterior log(pi(y) L[y, s_i]) (unnormalised logits). Returns prior, L, symbols, counts."""
    g = torch.Generator().manual_seed(seed)
    num_classes, num_symbols = 4, 6
    prior = torch.rand(num_classes, generator=g, dtype=torch.float64) + 0.2
    prior /= prior.sum()
    table = torch.rand(num_classes, num_symbols, generator=g, dtype=torch.float64) + 0.05
    table /= table.sum(1, keepdim=True)
    counts = torch.tensor([1, 2, 3, 5, 8])
    symbols = torch.randint(0, num_symbols, (int(counts.sum()),), generator=g)
    return prior, table, symbols, counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bayes_equals_exact_posterior_for_conditionally_independent_members(seed: int) -> None:
    prior, table, symbols, counts = _independent_case(seed)
    logits = (prior.log()[None, :] + table[:, symbols].T.log()).float() + 3.0  # a constant shift is harmless
    got = aggregate("bayes", MemberOutputs(logits), counts, log_prior_of(prior))
    start = 0
    for t, n in enumerate(counts.tolist()):
        exact = prior.log() + table[:, symbols[start : start + n]].log().sum(1)
        start += n
        torch.testing.assert_close(got[t].double(), exact.log_softmax(0), atol=1e-5, rtol=0)
    # mean_prob is not the exact posterior once n > 1 (so the comparison above is informative)
    averaged = aggregate("mean_prob", MemberOutputs(logits), counts, log_prior_of(prior))
    assert not torch.allclose(averaged[counts > 1], got[counts > 1], atol=1e-3)


@pytest.mark.parametrize("name", AVERAGING)
def test_at_n_equal_one_the_averaging_aggregators_return_the_single_prediction(name: str) -> None:
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(3)) * 4
    prior = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    got = aggregate(name, MemberOutputs(logits), torch.ones(7, dtype=torch.long), log_prior_of(prior))
    torch.testing.assert_close(got, logits.log_softmax(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", AVERAGING)
def test_batched_tuples_match_tuples_aggregated_alone(name: str) -> None:
    s = digits_splits()
    logits, _ = digits_mlp().forward_with_hidden(torch.as_tensor(s.x_test[:20]))
    logits = logits.detach()
    counts = torch.tensor([1, 4, 2, 6, 7])
    log_prior = log_prior_of(torch.as_tensor(s.prior))
    together = aggregate(name, MemberOutputs(logits), counts, log_prior)
    start = 0
    for t, n in enumerate(counts.tolist()):
        alone = aggregate(name, MemberOutputs(logits[start : start + n]), torch.tensor([n]), log_prior)
        torch.testing.assert_close(together[t : t + 1], alone, atol=1e-5, rtol=0)
        start += n
    assert torch.allclose(together.exp().sum(1), torch.ones(len(counts)), atol=1e-5)


def test_aggregation_helps_on_real_tuples() -> None:
    """Averaging 8 same-class digits under a weak network beats one digit (the premise of the project)."""
    s = digits_splits()
    logits = digits_mlp()(torch.as_tensor(s.x_test)).detach()
    y = torch.as_tensor(s.y_test)
    single = float((logits.argmax(1) == y).double().mean())
    order = torch.argsort(y, stable=True)
    groups = [order[y[order] == c][:8] for c in range(s.num_classes)]
    rows = torch.cat(groups)
    counts = torch.tensor([len(g) for g in groups])
    labels = torch.arange(s.num_classes)
    for name in AVERAGING:
        post = aggregate(name, MemberOutputs(logits[rows]), counts, log_prior_of(torch.as_tensor(s.prior)))
        assert n_accuracy(post, labels).value >= single


def test_aggregate_rejects_bad_input() -> None:
    logits = torch.randn(4, 3)
    lp = torch.zeros(3)
    with pytest.raises(ValueError, match="add up"):
        aggregate("mean_prob", MemberOutputs(logits), torch.tensor([2, 1]), lp)
    with pytest.raises(ValueError, match="positive"):
        aggregate("mean_prob", MemberOutputs(logits), torch.tensor([4, 0]), lp)
    with pytest.raises(ValueError, match="hidden"):
        aggregate("lstm", MemberOutputs(logits), torch.tensor([4]), lp)
    with pytest.raises(ValueError, match="gadget"):
        aggregate("lstm", MemberOutputs(logits, torch.randn(4, 2)), torch.tensor([4]), lp)
    with pytest.raises(KeyError, match="unknown aggregator"):
        aggregate("median", MemberOutputs(logits), torch.tensor([4]), lp)
    assert {"mean_prob", "mean_logit", "bayes", "lstm", "deepsets"} <= set(list_aggregators())


def test_averaging_flops_are_one_accumulate_per_member_and_class() -> None:
    for name in AVERAGING:
        assert get_aggregator(name).flops(5, 10, None) == 50


def test_relative_information_is_zero_for_the_prior_and_one_for_a_correct_one_hot() -> None:
    prior = torch.tensor([0.5, 0.25, 0.125, 0.125])
    labels = torch.tensor([0, 1, 2, 3, 0, 0, 1, 0])  # label frequencies equal the prior: E[-ln pi(y)] = H(pi)
    at_prior = log_prior_of(prior).expand(len(labels), -1)
    assert relative_information(at_prior, labels, prior).value == pytest.approx(0.0, abs=1e-6)
    one_hot = (torch.nn.functional.one_hot(labels, 4).float() * 1000).log_softmax(1)
    assert relative_information(one_hot, labels, prior).value == pytest.approx(1.0, abs=1e-9)
    wrong = (torch.nn.functional.one_hot((labels + 1) % 4, 4).float() * 5).log_softmax(1)
    assert relative_information(wrong, labels, prior).value < 0


def test_n_accuracy_and_its_interval() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    post = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 1]), 3).float().log_softmax(1)
    est = n_accuracy(post, labels)
    assert est.value == pytest.approx(0.8)
    # the Wilson score interval of 8 hits in 10 (tabulated: 0.4902 to 0.9433), see tests/test_metrics_intervals.py
    assert est.low == pytest.approx(0.4902, abs=1e-4) and est.high == pytest.approx(0.9433, abs=1e-4)


def test_stateful_metrics_match_the_functions() -> None:
    g = torch.Generator().manual_seed(5)
    post = torch.randn(30, 4, generator=g).log_softmax(1)
    labels = torch.randint(0, 4, (30,), generator=g)
    prior = torch.full((4,), 0.25)
    m = TupleMetrics(prior)
    m.update(post[:11], labels[:11])
    m.update(post[11:], labels[11:])
    out = m.compute()
    assert out["n_accuracy"] == n_accuracy(post, labels)
    assert out["relative_information"].value == pytest.approx(relative_information(post, labels, prior).value)
    m.reset()
    with pytest.raises(ValueError):
        m.compute()


def test_log_softmax_rows_matches_torch_including_extreme_logits() -> None:
    from models.aggregation import log_softmax_rows

    x = torch.randn(64, 10, dtype=torch.float64) * 30
    x[0] = torch.tensor([1e4, -1e4, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(log_softmax_rows(x), x.log_softmax(1))
    assert torch.isfinite(log_softmax_rows(x)).all()


@pytest.mark.parametrize("name", ["bayes", "mean_prob", "mean_logit"])
def test_single_member_tuples_get_that_members_log_softmax(name: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(30, 10) * 5
    log_prior = torch.log_softmax(torch.randn(10), 0)
    got = aggregate(name, MemberOutputs(logits), torch.ones(30, dtype=torch.long), log_prior)
    torch.testing.assert_close(got, logits.double().log_softmax(1).float())
    # n = 2 identical members takes the general path: averaging changes nothing, bayes counts the evidence twice
    twice = aggregate(name, MemberOutputs(logits.repeat_interleave(2, 0)), torch.full((30,), 2), log_prior)
    ls = logits.double().log_softmax(1)
    expected = (2 * ls - log_prior.double()).log_softmax(1) if name == "bayes" else ls
    torch.testing.assert_close(twice, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", AVERAGING)
def test_aggregate_many_gives_every_set_what_it_gets_alone(name: str) -> None:
    """Sets of clusters of the digits test split (members of one set share nothing with another's), some with every
    cluster of one member (the aggregators' shortcut branch) and some not: `aggregate_many` returns each set's rows
    bit for bit as `aggregate` of that set alone, and the log mean over a query's sets as computed by hand."""
    s = digits_splits()
    model = digits_mlp()  # trained on first use: outside inference mode
    with torch.inference_mode():
        logits, hidden = model.forward_with_hidden(torch.as_tensor(s.x_test[:60]))
    sets = [np.array([1, 1, 1]), np.array([2, 3, 1, 4]), np.array([1, 1]), np.array([5, 2]), np.array([1, 1, 1, 1])]
    counts = np.concatenate(sets)
    assert int(counts.sum()) <= len(logits)
    logits, hidden = logits[: int(counts.sum())], hidden[: int(counts.sum())]
    prior = log_prior_of(torch.from_numpy(np.bincount(s.y_train, minlength=s.num_classes) / len(s.y_train)))
    got = aggregate_many(name, MemberOutputs(logits, hidden), counts, np.array([len(c) for c in sets]), prior)
    alone, row = [], 0
    for c in sets:
        n = int(c.sum())
        alone.append(
            aggregate(name, MemberOutputs(logits[row : row + n], hidden[row : row + n]), torch.from_numpy(c), prior)
        )
        row += n
    assert torch.equal(got, torch.cat(alone))
    # a query of two examples over the same 3 clusters: its log mean posterior
    pair = torch.cat([alone[0], alone[4][:3]])
    mean = log_mean_posteriors(pair, np.array([2]), np.array([3]))
    expected = torch.logaddexp(alone[0].double(), alone[4][:3].double()) - np.log(2)
    assert torch.equal(mean, expected)
    assert not torch.equal(mean, alone[0].double())  # the second example moved it
