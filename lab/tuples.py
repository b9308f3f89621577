"""Shared-label n-tuples: sampling them from a split (a label y ~ prior, then n items of class y), training
classifier gadgets on them, and the experiment that measures every aggregator on a dense model and its
compression levels (n-accuracy, RI, FLOPs per tuple, and per FLOPs budget the best variant and n: the sweet spot).
The command is `python -m lab.run_tuples`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from cascade.ranking_metrics import best_within_budget
from lab.metrics import n_accuracy, relative_information
from models.aggregation import MemberOutputs, aggregate, get_aggregator, log_prior_of
from models.data import Splits
from models.gadget import GADGET_KINDS, Gadget, GadgetSpec
from models.gadget_training import GadgetTrainConfig, TupleDraw, hidden_of, train_gadget_on
from models.networks import Classifier

__all__ = [
    "TupleBatch",
    "sample_tuples",
    "train_gadget",
    "ExperimentNetwork",
    "ResultRow",
    "SweetSpotRow",
    "ExperimentResult",
    "largest_n_within",
    "run_experiment",
    "DEFAULT_AGGREGATORS",
    "GADGET_AGGREGATORS",
    "result_row",
    "sweet_spot_of",
]

DEFAULT_AGGREGATORS = ("mean_prob", "mean_logit", "bayes", "lstm", "deepsets")
GADGET_AGGREGATORS = GADGET_KINDS


@dataclass(frozen=True)
class TupleBatch:
    """`index[k]` is the split row of member k; tuple t owns the contiguous run of `counts[t]` members."""

    index: torch.Tensor
    counts: torch.Tensor
    labels: torch.Tensor


def sample_tuples(
    labels: torch.Tensor | np.ndarray,
    prior: torch.Tensor | np.ndarray,
    counts: torch.Tensor,
    generator: torch.Generator,
) -> TupleBatch:
    """Project definition: y ~ prior, then counts[t] members of class y. Members of one tuple are distinct rows
    (drawn without replacement inside the tuple; tuples are independent)."""
    labels = torch.as_tensor(labels).long()
    prior = torch.as_tensor(prior, dtype=torch.float64)
    counts = torch.as_tensor(counts).long()
    if len(counts) == 0 or bool((counts < 1).any()):
        raise ValueError("every tuple needs at least one member")
    ys = torch.multinomial(prior, len(counts), replacement=True, generator=generator)
    offsets = torch.cumsum(counts, 0) - counts
    index = torch.empty(int(counts.sum()), dtype=torch.long)
    for c in ys.unique().tolist():
        rows = torch.nonzero(labels == c).squeeze(1)
        tuples = torch.nonzero(ys == c).squeeze(1)
        width = int(counts[tuples].max())
        if len(rows) < width:
            raise ValueError(f"class {c} has {len(rows)} items, fewer than the {width} members asked for")
        picks = rows[torch.rand(len(tuples), len(rows), generator=generator).argsort(1)[:, :width]]
        mask = torch.arange(width)[None, :] < counts[tuples][:, None]
        index[(offsets[tuples][:, None] + torch.arange(width)[None, :])[mask]] = picks[mask]
    return TupleBatch(index=index, counts=counts, labels=ys)


def train_gadget(
    spec: GadgetSpec,
    hidden_train: torch.Tensor,
    y_train: torch.Tensor,
    hidden_val: torch.Tensor,
    y_val: torch.Tensor,
    prior: torch.Tensor,
    config: GadgetTrainConfig = GadgetTrainConfig(),
) -> Gadget:
    """Train on tuples of precomputed hidden representations (the network is frozen by construction: only its
    outputs are seen). The gadget with the lowest validation cross-entropy is kept; standardisation is folded."""
    if hidden_train.shape[1] != spec.input_dim:
        raise ValueError(f"gadget expects {spec.input_dim}-dim hidden representations, got {hidden_train.shape[1]}")
    hidden_train = hidden_train.float()
    hidden_val = hidden_val.float()

    def draw_from(hidden: torch.Tensor, labels: torch.Tensor) -> TupleDraw:
        def draw(counts: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            batch = sample_tuples(labels, prior, counts, gen)
            return hidden[batch.index], batch.labels

        return draw

    return train_gadget_on(
        spec,
        draw_from(hidden_train, y_train),
        draw_from(hidden_val, y_val),
        (hidden_train.mean(0), hidden_train.std(0).clamp_min(1e-3)),
        config,
    )


@dataclass
class ExperimentNetwork:
    """One network of the experiment. `flops` is the per-item cost used for budgets: nonzero FLOPs (a sparse
    kernel) for masked networks, which equals the dense-kernel count for dense and structurally pruned ones."""

    label: str
    method: str
    keep: float
    model: Classifier
    flops: int
    flops_dense_kernel: int
    gadgets: dict[str, Gadget] = field(default_factory=dict)


@dataclass(frozen=True)
class ResultRow:
    variant: str
    method: str
    keep: float
    accuracy: float
    flops_item: int
    flops_item_dense_kernel: int
    aggregator: str
    n: int
    flops_aggregator: int
    flops_tuple: int
    n_accuracy: float
    n_accuracy_low: float
    n_accuracy_high: float
    ri: float
    ri_low: float
    ri_high: float
    tuples: int


@dataclass(frozen=True)
class SweetSpotRow:
    """For one budget and aggregator: the variant with the best n-accuracy among those whose n fits."""

    budget: int
    aggregator: str
    variant: str
    method: str
    keep: float
    n: int
    flops_tuple: int
    n_accuracy: float
    n_accuracy_low: float
    n_accuracy_high: float
    ri: float
    capped: bool
    """True when n was limited by the cap (the budget would allow more members)."""


@dataclass
class ExperimentResult:
    rows: list[ResultRow]
    budget_rows: list[ResultRow]
    sweet_spots: list[SweetSpotRow]
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "rows": [asdict(r) for r in self.rows],
            "budget_rows": [asdict(r) for r in self.budget_rows],
            "sweet_spots": [asdict(r) for r in self.sweet_spots],
        }


def largest_n_within(budget: int, flops_item: int, agg_flops: Callable[[int], int], n_cap: int) -> tuple[int, bool]:
    """The largest n <= n_cap with n * flops_item + agg_flops(n) <= budget (0 if none), and whether the cap bit."""
    n = 0
    while n < n_cap and (n + 1) * flops_item + agg_flops(n + 1) <= budget:
        n += 1
    capped = n == n_cap and (n + 1) * flops_item + agg_flops(n + 1) <= budget
    return n, capped


class _Evaluator:
    """Caches one variant's test outputs and evaluates (aggregator, n) on tuples shared by every variant."""

    def __init__(self, splits: Splits, num_tuples: int, seed: int) -> None:
        self.splits = splits
        self.num_tuples = num_tuples
        self.seed = seed
        self.prior = torch.as_tensor(splits.prior, dtype=torch.float64)
        self.log_prior = log_prior_of(self.prior)
        self._batches: dict[int, TupleBatch] = {}

    def batch(self, n: int) -> TupleBatch:
        if n not in self._batches:  # the same tuples for every variant and aggregator: paired comparisons
            gen = torch.Generator().manual_seed(self.seed * 1000 + n)
            counts = torch.full((self.num_tuples,), n, dtype=torch.long)
            self._batches[n] = sample_tuples(self.splits.y_test, self.prior, counts, gen)
        return self._batches[n]

    def evaluate(
        self, variant: ExperimentNetwork, outputs: MemberOutputs, accuracy: float, aggregator: str, n: int
    ) -> ResultRow:
        batch = self.batch(n)
        members = MemberOutputs(outputs.logits[batch.index], outputs.hidden[batch.index])  # type: ignore[index]
        return result_row(
            variant, accuracy, aggregator, n, members, batch.counts, batch.labels, self.prior, self.log_prior
        )


def result_row(
    variant: ExperimentNetwork,
    accuracy: float,
    aggregator: str,
    n: int,
    members: MemberOutputs,
    counts: torch.Tensor,
    labels: torch.Tensor,
    prior: torch.Tensor,
    log_prior: torch.Tensor,
) -> ResultRow:
    """One cell: aggregate tuples of n members each (`counts`, contiguous runs of `members`) and measure
    n-accuracy and RI (relative to `prior`, the distribution the tuples' labels were drawn from) and FLOPs.
    `log_prior` is what `bayes` divides out: the prior the network's outputs were trained under. Shared by the
    classifier experiment and the pair-model one (`lab.pair_tuples`)."""
    gadget = variant.gadgets.get(aggregator)
    log_post = aggregate(aggregator, members, counts, log_prior, gadget=gadget)
    acc = n_accuracy(log_post, labels)
    ri = relative_information(log_post, labels, prior)
    agg_flops = get_aggregator(aggregator).flops(n, log_post.shape[1], gadget)
    return ResultRow(
        variant=variant.label,
        method=variant.method,
        keep=variant.keep,
        accuracy=accuracy,
        flops_item=variant.flops,
        flops_item_dense_kernel=variant.flops_dense_kernel,
        aggregator=aggregator,
        n=n,
        flops_aggregator=agg_flops,
        flops_tuple=n * variant.flops + agg_flops,
        n_accuracy=acc.value,
        n_accuracy_low=acc.low,
        n_accuracy_high=acc.high,
        ri=ri.value,
        ri_low=ri.low,
        ri_high=ri.high,
        tuples=len(labels),
    )


def sweet_spot_of(budget: int, aggregator: str, candidates: Sequence[tuple[ResultRow, bool]]) -> SweetSpotRow | None:
    """The best (n-accuracy, then RI) of the rows a budget buys, one per variant, with whether its n was capped."""
    rows = [r for r, _ in candidates]
    best = best_within_budget([r.flops_tuple for r in rows], [(r.n_accuracy, r.ri) for r in rows], budget)
    if best is None:
        return None
    r, capped = candidates[best]
    return SweetSpotRow(
        budget,
        aggregator,
        r.variant,
        r.method,
        r.keep,
        r.n,
        r.flops_tuple,
        r.n_accuracy,
        r.n_accuracy_low,
        r.n_accuracy_high,
        r.ri,
        capped,
    )


def _agg_flops(aggregator: str, num_classes: int, variant: ExperimentNetwork) -> Callable[[int], int]:
    agg, gadget = get_aggregator(aggregator), variant.gadgets.get(aggregator)
    return lambda n: agg.flops(n, num_classes, gadget)


def _train_missing_gadgets(
    variant: ExperimentNetwork, splits: Splits, aggregators: Sequence[str], hidden_size: int, config: GadgetTrainConfig
) -> None:
    needed = [a for a in aggregators if a in GADGET_AGGREGATORS and a not in variant.gadgets]
    if not needed:
        return
    _, h_train = hidden_of(variant.model, splits.x_train)
    _, h_val = hidden_of(variant.model, splits.x_val)
    prior = torch.as_tensor(splits.prior)
    for kind in needed:
        spec = GadgetSpec(kind, h_train.shape[1], splits.num_classes, hidden_size)  # type: ignore[arg-type]
        variant.gadgets[kind] = train_gadget(
            spec, h_train, torch.as_tensor(splits.y_train), h_val, torch.as_tensor(splits.y_val), prior, config
        )


def run_experiment(
    splits: Splits,
    variants: Sequence[ExperimentNetwork],
    *,
    ns: Sequence[int] = (1, 2, 4, 8, 16),
    aggregators: Sequence[str] = DEFAULT_AGGREGATORS,
    budgets: Sequence[int] = (),
    num_tuples: int = 2000,
    n_cap: int = 32,
    gadget_hidden: int = 32,
    gadget_config: GadgetTrainConfig | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda _msg: None,
) -> ExperimentResult:
    """Trains the missing gadgets (network frozen) on the training split, evaluates every (variant, aggregator, n)
    on test-split tuples, then for each budget finds the largest affordable n per variant and the best variant."""
    gadget_config = gadget_config or GadgetTrainConfig(seed=seed)
    ev = _Evaluator(splits, num_tuples, seed)
    rows: list[ResultRow] = []
    budget_rows: list[ResultRow] = []
    sweet: list[SweetSpotRow] = []
    outputs: dict[str, tuple[MemberOutputs, float]] = {}
    for v in variants:
        _train_missing_gadgets(v, splits, aggregators, gadget_hidden, gadget_config)
        logits, hidden = hidden_of(v.model, splits.x_test)
        acc = float((logits.argmax(1).numpy() == splits.y_test).mean())
        outputs[v.label] = (MemberOutputs(logits, hidden), acc)
        for agg in aggregators:
            for n in ns:
                rows.append(ev.evaluate(v, outputs[v.label][0], acc, agg, n))
        log(f"{v.label}: accuracy {acc:.4f}, {v.flops:,} FLOPs per item, evaluated")
    cap = min(n_cap, int(np.bincount(splits.y_test).min()))
    for budget in budgets:
        for agg in aggregators:
            candidates: list[tuple[ResultRow, bool]] = []
            for v in variants:
                n, capped = largest_n_within(budget, v.flops, _agg_flops(agg, splits.num_classes, v), cap)
                if n < 1:
                    continue
                out, acc = outputs[v.label]
                row = ev.evaluate(v, out, acc, agg, n)
                budget_rows.append(row)
                candidates.append((row, capped))
            spot = sweet_spot_of(budget, agg, candidates)
            if spot is not None:
                sweet.append(spot)
        log(f"budget {budget:,}: done")
    config = {
        "ns": list(ns),
        "aggregators": list(aggregators),
        "budgets": list(budgets),
        "num_tuples": num_tuples,
        "n_cap": cap,
        "gadget_hidden": gadget_hidden,
        "gadget_train": asdict(gadget_config),
        "seed": seed,
        "dataset": splits.name,
    }
    return ExperimentResult(rows, budget_rows, sweet, config)
