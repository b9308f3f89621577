"""Tuple sampling, the experiment logic and its command (`python -m lab.run_tuples`) on real (digits) data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from aggregation_fixtures import digits_mlp, digits_splits

from lab.tuples import ExperimentNetwork, largest_n_within, run_experiment, sample_tuples
from models.flops import count_flops
from models.gadget_training import GadgetTrainConfig
from models.pruning import prune
from models.registry import ModelRegistry


def test_members_share_their_tuple_label_and_are_distinct() -> None:
    s = digits_splits()
    counts = torch.tensor([1, 5, 3, 8, 2, 8])
    batch = sample_tuples(s.y_test, torch.as_tensor(s.prior), counts, torch.Generator().manual_seed(0))
    assert len(batch.index) == int(counts.sum()) and torch.equal(batch.counts, counts)
    y = torch.as_tensor(s.y_test)
    start = 0
    for t, n in enumerate(counts.tolist()):
        rows = batch.index[start : start + n]
        assert bool((y[rows] == batch.labels[t]).all())
        assert len(rows.unique()) == n
        start += n


def test_labels_follow_the_prior() -> None:
    s = digits_splits()
    prior = torch.zeros(s.num_classes, dtype=torch.float64)
    prior[[2, 7]] = torch.tensor([0.25, 0.75], dtype=torch.float64)
    batch = sample_tuples(s.y_test, prior, torch.full((400,), 2), torch.Generator().manual_seed(1))
    assert set(batch.labels.tolist()) == {2, 7}
    assert 0.6 < float((batch.labels == 7).double().mean()) < 0.9


def test_sampling_refuses_tuples_larger_than_a_class() -> None:
    s = digits_splits()
    too_many = int(torch.bincount(torch.as_tensor(s.y_test)).min()) + 1
    prior = torch.zeros(s.num_classes, dtype=torch.float64)
    prior[int(torch.bincount(torch.as_tensor(s.y_test)).argmin())] = 1.0
    with pytest.raises(ValueError, match="fewer than"):
        sample_tuples(s.y_test, prior, torch.tensor([too_many]), torch.Generator().manual_seed(0))


def test_largest_n_within_a_budget() -> None:
    assert largest_n_within(1000, 100, lambda n: 10 * n, 32) == (9, False)  # 9 * 110 = 990 <= 1000 < 1100
    assert largest_n_within(99, 100, lambda n: 0, 32) == (0, False)
    assert largest_n_within(10_000, 100, lambda n: 0, 4) == (4, True)


def _variants() -> list[ExperimentNetwork]:
    dense = digits_mlp()
    out = []
    for label, method, keep, model in [
        ("dense", "dense", 1.0, dense),
        ("magnitude@0.2", "magnitude", 0.2, prune(dense, "magnitude", 0.2)),
    ]:
        f = count_flops(model, model.spec.input_dim)
        out.append(ExperimentNetwork(label, method, keep, model, f.nonzero, f.dense_kernel))
    return out


def test_experiment_rows_costs_and_sweet_spot() -> None:
    s = digits_splits()
    variants = _variants()
    before = {k: v.clone() for k, v in variants[0].model.state_dict().items()}
    budgets = [variants[0].flops * 2, variants[0].flops * 6]
    config = GadgetTrainConfig(n_max=8, steps=60, batch_tuples=32, eval_every=30, val_tuples=100)
    aggs = ("mean_prob", "bayes", "lstm")
    result = run_experiment(
        s, variants, ns=(1, 4), aggregators=aggs, budgets=budgets, num_tuples=200, n_cap=8, gadget_config=config
    )
    assert len(result.rows) == len(variants) * len(aggs) * 2
    for r in result.rows:
        v = next(v for v in variants if v.label == r.variant)
        assert r.flops_tuple == r.n * v.flops + r.flops_aggregator
        assert r.n_accuracy_low <= r.n_accuracy <= r.n_accuracy_high
        if r.aggregator == "lstm":
            assert r.flops_aggregator == v.gadgets["lstm"].flops(r.n)
    assert variants[1].flops < variants[0].flops  # nonzero FLOPs of the masked network
    for sp in result.sweet_spots:
        assert sp.flops_tuple <= sp.budget
        candidates = [r for r in result.budget_rows if r.aggregator == sp.aggregator and r.flops_tuple <= sp.budget]
        assert sp.n_accuracy == max(
            r.n_accuracy for r in candidates if r.n == max(c.n for c in candidates if c.variant == r.variant)
        )
    assert {sp.aggregator for sp in result.sweet_spots} == set(aggs)
    for k, v in variants[0].model.state_dict().items():
        assert torch.equal(v, before[k])  # gadgets are trained with the network frozen


def test_tuples_command_end_to_end(tmp_path: Path) -> None:
    from lab import run_tuples as command

    registry = ModelRegistry(tmp_path / "registry")
    registry.register("dense", digits_mlp(), accuracy=0.5, dataset="digits", extra={"data_args": {"seed": 0}})
    out = tmp_path / "out"
    code = command.main(  # `python -m lab.run_tuples ...`
        [
            "--home",
            str(tmp_path),
            "--source",
            "prune",
            "--methods",
            "magnitude,layer-weight-norm",
            "--keeps",
            "0.5",
            "--ns",
            "1,2",
            "--aggregators",
            "mean_prob,lstm",
            "--budgets",
            "1,3",
            "--tuples",
            "100",
            "--gadget-steps",
            "40",
            "--gadget-n-max",
            "4",
            "--n-cap",
            "4",
            "--out",
            str(out),
            "--save-gadgets",
        ]
    )
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 3 * 2 * 2
    assert {r["method"] for r in data["rows"]} == {"dense", "magnitude", "layer-weight-norm"}
    for name in ("results.csv", "sweet_spots.csv", "summary.md", "aggregation_n_accuracy.png"):
        assert (out / name).stat().st_size > 0
    assert registry.load("dense").gadget is not None  # --save-gadgets stored the dense model's lstm gadget
