"""The n-accuracy / RI / FLOPs experiment of `lab.tuples` on pair models, over the pair tuples of
`models.pair_gadget_training` (a query, a cluster of known grade for it, n of its members)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lab.tuples import (
    ExperimentNetwork,
    ExperimentResult,
    ResultRow,
    SweetSpotRow,
    largest_n_within,
    result_row,
    sweet_spot_of,
)
from models.aggregation import get_aggregator, log_prior_of
from models.gadget import GADGET_KINDS
from models.gadget_training import GadgetTrainConfig
from models.pair import PairNetwork, pair_flops
from models.pair_gadget_training import PairTupleOutputs, PairTuples, pair_tuple_outputs_many, train_pair_gadget

__all__ = ["pair_variant", "run_pair_experiment"]


def pair_variant(label: str, method: str, keep: float, model: PairNetwork) -> ExperimentNetwork:
    """A pair model as a `lab.tuples.ExperimentNetwork`, costed per pair as served (folded; `pair_flops`)."""
    f = pair_flops(model)
    return ExperimentNetwork(label, method, keep, model, f.nonzero, f.dense_kernel)  # type: ignore[arg-type]


def _agg_flops(aggregator: str, variant: ExperimentNetwork) -> Callable[[int], int]:
    agg, gadget = get_aggregator(aggregator), variant.gadgets.get(aggregator)
    grades = variant.model.spec.num_grades  # type: ignore[union-attr]
    return lambda n: agg.flops(n, grades, gadget)


def run_pair_experiment(
    variants: Sequence[ExperimentNetwork],
    train: PairTuples,
    val: PairTuples,
    test: PairTuples,
    *,
    tuple_prior: Sequence[float],
    model_prior: Sequence[float],
    ns: Sequence[int] = tuple(range(1, 17)),
    aggregators: Sequence[str] = ("mean_prob", "mean_logit", "bayes", "lstm", "deepsets"),
    budgets: Sequence[int] = (),
    gadget_hidden: int = 32,
    gadget_config: GadgetTrainConfig | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> ExperimentResult:
    """For every variant: its outputs on the three tuple sets, gadgets trained on `train` (checkpoint on `val`),
    then every (aggregator, n) on `test`; per FLOPs budget per tuple the largest affordable n <= test.n_max per
    variant and the best variant. RI is relative to `tuple_prior` (the grades' distribution in the tuples);
    `bayes` divides out `model_prior` (the grade mix the pair models were trained under), as the engine does."""
    gadget_config = gadget_config or GadgetTrainConfig(n_max=train.n_max)
    prior = torch.tensor(tuple_prior, dtype=torch.float64)
    prior = prior / prior.sum()
    log_prior = log_prior_of(torch.tensor(model_prior, dtype=torch.float64))
    rows: list[ResultRow] = []
    budget_rows: list[ResultRow] = []
    sweet: list[SweetSpotRow] = []
    tests: dict[str, tuple[PairTupleOutputs, float]] = {}
    models = [v.model for v in variants]
    if any(not isinstance(m, PairNetwork) for m in models):
        raise TypeError("every variant must be a pair model")
    needs = [[a for a in aggregators if a in GADGET_KINDS and a not in v.gadgets] for v in variants]
    if any(needs):
        which = [i for i, need in enumerate(needs) if need]
        train_out = pair_tuple_outputs_many([models[i] for i in which], train)  # type: ignore[misc]
        val_out = pair_tuple_outputs_many([models[i] for i in which], val)  # type: ignore[misc]
        for j, i in enumerate(which):
            for kind in needs[i]:
                variants[i].gadgets[kind] = train_pair_gadget(
                    kind, train_out[j], val_out[j], hidden_size=gadget_hidden, config=gadget_config
                )
            log(f"{variants[i].label}: gadgets {', '.join(needs[i])} trained")
        del train_out, val_out
    test_out = pair_tuple_outputs_many(models, test)  # type: ignore[arg-type]
    for v, out in zip(variants, test_out, strict=True):
        acc = float((out.logits[:, 0].argmax(1) == out.grades).float().mean())  # one member: pair accuracy
        tests[v.label] = (out, acc)
        for agg in aggregators:
            for n in ns:
                members, counts = out.first(n)
                rows.append(result_row(v, acc, agg, n, members, counts, out.grades, prior, log_prior))
        log(f"{v.label}: pair accuracy {acc:.4f}, {v.flops:,} FLOPs per pair, evaluated")
    for budget in budgets:
        for agg in aggregators:
            candidates: list[tuple[ResultRow, bool]] = []
            for v in variants:
                n, capped = largest_n_within(budget, v.flops, _agg_flops(agg, v), test.n_max)
                if n < 1:
                    continue
                out, acc = tests[v.label]
                members, counts = out.first(n)
                row = result_row(v, acc, agg, n, members, counts, out.grades, prior, log_prior)
                budget_rows.append(row)
                candidates.append((row, capped))
            spot = sweet_spot_of(budget, agg, candidates)
            if spot is not None:
                sweet.append(spot)
    config = {
        "ns": list(ns),
        "aggregators": list(aggregators),
        "budgets": list(budgets),
        "num_tuples": len(test),
        "train_tuples": len(train),
        "val_tuples": len(val),
        "n_cap": test.n_max,
        "tuple_prior": [float(p) for p in prior],
        "tuple_prior_entropy_nats": -sum(float(p) * math.log(float(p)) for p in prior if p > 0),
        "model_prior": list(model_prior),
        "gadget_hidden": gadget_hidden,
        "gadget_train": gadget_config.__dict__,
    }
    return ExperimentResult(rows, budget_rows, sweet, config)
