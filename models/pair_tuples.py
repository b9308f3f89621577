"""Pair tuples (issue 14 items 4 and 7): a query q, a cluster whose grade g for q is known, and n of its members.

The shared label of the tuple is the grade: every member of a cluster has the cluster's grade for q (clusters
are views of one prototype, `models.prototypes`). The pair model scores (q, member) for each member and the
aggregators of `models.aggregation` turn the n outputs into one grade posterior, exactly as a cascade stage does
for one candidate cluster. This module samples such tuples, computes a pair model's outputs on them, trains
gadgets (LSTM, deep sets) on the hidden states with the model frozen, and runs the n-accuracy / RI / FLOPs
experiment of `models.tuples` on pair models.

Sampling: a query prototype, then g ~ grade prior, then the cluster: the query's own prototype (g = 2), another
prototype of the same digit (g = 1; a `hard_fraction` of them among its most similar prototypes, as in pair
training) or a prototype of another digit (g = 0); the query and the n_max members are fresh views (never stored
items; members are exchangeable with a cluster's stored views). A tuple of size n < n_max uses its first n
members, so the tuples of every n share queries and clusters (paired comparisons over n).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from models.aggregation import MemberOutputs, aggregate, get_aggregator, log_prior_of
from models.gadget import Gadget, GadgetSpec, GadgetTrainConfig, TupleDraw, gadget_misfit, train_gadget_on
from models.pair import PairNetwork, pair_flops
from models.pair_training import sample_pair_ids
from models.prototypes import PrototypeConfig, Prototypes, make_prototypes, make_views, similar_prototypes
from models.registry import ModelRegistry
from models.tuples import (
    GADGET_AGGREGATORS,
    ExperimentNetwork,
    ExperimentResult,
    ResultRow,
    SweetSpotRow,
    largest_n_within,
    result_row,
    sweet_spot_of,
)

__all__ = [
    "PairTuples",
    "PairTupleOutputs",
    "sample_pair_tuples",
    "pair_tuple_outputs",
    "pair_tuple_outputs_many",
    "draw_from_pool",
    "train_pair_gadget",
    "gadget_misfit",
    "pair_variant",
    "run_pair_experiment",
    "HARD_FRACTION",
    "store_pair_gadget",
    "train_gadget_for",
]

HARD_FRACTION = 0.5
"""Share of grade-1 clusters drawn among the query prototype's 10 most similar same-digit prototypes: the
pair models' own training mix (`PairTrainConfig.hard_fraction`)."""


@dataclass(frozen=True)
class PairTuples:
    """T tuples of up to n_max members: queries (T, D), members (T, n_max, D), grades (T,); the prototype ids
    of the query and of the cluster, so that the grade can be checked against `models.prototypes.grades`."""

    queries: torch.Tensor
    members: torch.Tensor
    grades: torch.Tensor
    query_ids: np.ndarray
    cluster_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.grades)

    @property
    def n_max(self) -> int:
        return int(self.members.shape[1])


@dataclass(frozen=True)
class PairTupleOutputs:
    """A pair model's outputs on every (query, member) of some tuples: logits (T, n_max, G), hidden (T, n_max, H)."""

    logits: torch.Tensor
    hidden: torch.Tensor
    grades: torch.Tensor

    @property
    def n_max(self) -> int:
        return int(self.logits.shape[1])

    def first(self, n: int) -> tuple[MemberOutputs, torch.Tensor]:
        """Tuples of the first n members each: member rows in contiguous runs, and counts."""
        if not 1 <= n <= self.logits.shape[1]:
            raise ValueError(f"n must be in 1..{self.logits.shape[1]}, got {n}")
        logits = self.logits[:, :n].reshape(-1, self.logits.shape[2])
        hidden = self.hidden[:, :n].reshape(-1, self.hidden.shape[2])
        return MemberOutputs(logits, hidden), torch.full((len(self.grades),), n, dtype=torch.long)


def sample_pair_tuples(
    protos: Prototypes,
    count: int,
    n_max: int,
    grade_prior: Sequence[float],
    seed: int,
    *,
    hard_fraction: float = HARD_FRACTION,
    neighbours: np.ndarray | None = None,
) -> PairTuples:
    """`count` tuples of `n_max` members over the prototypes `protos`; grades drawn from `grade_prior`
    (one probability per grade 0, 1, 2). Deterministic in `seed`."""
    if count < 1 or n_max < 1:
        raise ValueError("count and n_max must be positive")
    if len(grade_prior) != 3 or min(grade_prior) < 0 or sum(grade_prior) <= 0:
        raise ValueError("grade_prior needs three non-negative probabilities (grades 0, 1, 2)")
    rng = np.random.default_rng([seed, 41])
    if neighbours is None and hard_fraction > 0:
        neighbours = similar_prototypes(protos, 10)
    qid, cid, grade = sample_pair_ids(protos.digit, count, tuple(grade_prior), rng, neighbours, hard_fraction)
    q = make_views(protos, qid, rng)
    x = make_views(protos, np.repeat(cid, n_max), rng).reshape(count, n_max, -1)
    return PairTuples(torch.from_numpy(q), torch.from_numpy(x), torch.from_numpy(grade), qid, cid)


def pair_tuple_outputs(model: PairNetwork, tuples: PairTuples, batch_pairs: int = 4096) -> PairTupleOutputs:
    """(logits, hidden) of the pair model on every (query, member) pair, in eval mode: the unfolded path, which
    computes the same function as the folded one the engine serves (`PairNetwork.fold_query`)."""
    return pair_tuple_outputs_many([model], tuples, batch_pairs)[0]


def _same_front(a: PairNetwork, b: PairNetwork) -> bool:
    if a.spec.with_scorer(b.spec.scorer) != b.spec:
        return False
    sa = {**a.trunk.state_dict(), **{f"norm.{k}": v for k, v in a.norm.state_dict().items()}}
    sb = {**b.trunk.state_dict(), **{f"norm.{k}": v for k, v in b.norm.state_dict().items()}}
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@torch.no_grad()
def pair_tuple_outputs_many(
    models: Sequence[PairNetwork], tuples: PairTuples, batch_pairs: int = 4096
) -> list[PairTupleOutputs]:
    """`pair_tuple_outputs` of several pair models at once. Pruned variants of one dense model share its front
    end (trunk, correlation, normalisation: pruning and scorer-only fine-tuning leave it alone), so the
    interaction of each pair is computed once and fed to every scorer; models with another front end get
    their own pass."""
    models = list(models)
    for m in models:
        m.eval()
    t, k, d = tuples.members.shape
    q = tuples.queries[:, None, :].expand(t, k, d).reshape(-1, d)
    x = tuples.members.reshape(-1, d)
    groups: list[list[int]] = []
    for i, m in enumerate(models):
        group = next((g for g in groups if _same_front(models[g[0]], m)), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in models]
    for group in groups:
        front = models[group[0]]
        for start in range(0, len(x), batch_pairs):
            z = front.interaction(q[start : start + batch_pairs], x[start : start + batch_pairs])
            for i in group:
                parts[i].append(models[i].scorer.forward_with_hidden(z))
    return [
        PairTupleOutputs(
            torch.cat([p[0] for p in ps]).reshape(t, k, -1),
            torch.cat([p[1] for p in ps]).reshape(t, k, -1),
            tuples.grades.clone(),
        )
        for ps in parts
    ]


def draw_from_pool(pool: PairTupleOutputs) -> TupleDraw:
    """A gadget-training draw (`models.gadget.TupleDraw`) from precomputed pool tuples: each requested tuple of
    n members is a random pool tuple and n of its n_max members, distinct and in random order."""
    t, m = pool.hidden.shape[:2]

    def draw(counts: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        counts = counts.long()
        if int(counts.max()) > m:
            raise ValueError(f"the pool's tuples have {m} members; {int(counts.max())} were asked for")
        which = torch.randint(0, t, (len(counts),), generator=gen)
        order = torch.rand(len(counts), m, generator=gen).argsort(1)
        keep = torch.arange(m)[None, :] < counts[:, None]
        rows = pool.hidden[which[:, None].expand(-1, m), order]  # (B, m, H), members shuffled
        return rows[keep], pool.grades[which]

    return draw


def train_pair_gadget(
    kind: str,
    train: PairTupleOutputs,
    val: PairTupleOutputs,
    *,
    hidden_size: int = 32,
    config: GadgetTrainConfig | None = None,
) -> Gadget:
    """A gadget over the pair model's hidden states, trained on the `train` pool (model frozen: only its outputs
    are read), checkpoint chosen on the `val` pool. n is drawn from 1..config.n_max (<= the pools' n_max)."""
    config = config or GadgetTrainConfig(n_max=train.n_max)
    if config.n_max > min(train.n_max, val.n_max):
        raise ValueError(f"gadget training draws up to {config.n_max} members; the pools hold {train.n_max}")
    h = train.hidden.shape[2]
    spec = GadgetSpec(kind, h, train.logits.shape[2], hidden_size)  # type: ignore[arg-type]
    flat = train.hidden.reshape(-1, h).float()
    stats = (flat.mean(0), flat.std(0).clamp_min(1e-3))
    return train_gadget_on(spec, draw_from_pool(train), draw_from_pool(val), stats, config)


def pair_variant(label: str, method: str, keep: float, model: PairNetwork) -> ExperimentNetwork:
    """A pair model as a `models.tuples.ExperimentNetwork`, costed per pair as served (folded; `pair_flops`)."""
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
    needs = [[a for a in aggregators if a in GADGET_AGGREGATORS and a not in v.gadgets] for v in variants]
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


def store_pair_gadget(
    registry: ModelRegistry, name: str, version: int, gadget: Gadget, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Store a gadget beside the pair model `name:version` after checking that it fits it (`gadget_misfit`):
    a gadget that reads another hidden width or outputs other than the model's grades is refused (ValueError)."""
    loaded = registry.load(name, version)
    if not isinstance(loaded.model, PairNetwork):
        raise ValueError(f"{loaded.manifest.ref} is not a pair model")
    why = gadget_misfit(gadget, loaded.model)
    if why is not None:
        raise ValueError(f"refusing the gadget for {loaded.manifest.ref}: {why}")
    return registry.save_gadget(name, version, gadget, extra=extra)


def train_gadget_for(
    registry: ModelRegistry,
    name: str,
    version: int | None = None,
    *,
    kind: str = "lstm",
    train_tuples: int = 6000,
    val_tuples: int = 1000,
    n_max: int = 16,
    hidden_size: int = 32,
    steps: int = 1500,
    seed: int = 0,
) -> tuple[Gadget, dict[str, Any]]:
    """Train a gadget for a registered pair model on tuples of its training prototypes (the prototype config and
    grade prior in its manifest), choosing the checkpoint on tuples of prototypes no model trained on. Returns
    the gadget and a record (sizes, seed, and validation n-accuracy of the gadget and of `mean_logit`, n drawn
    from 1..n_max) for the stored gadget's `extra`."""
    if kind not in GADGET_AGGREGATORS:
        raise ValueError(f"kind must be one of {', '.join(GADGET_AGGREGATORS)}, got {kind!r}")
    loaded = registry.load(name, version)
    model, manifest = loaded.model, loaded.manifest
    if not isinstance(model, PairNetwork):
        raise ValueError(
            f"{manifest.ref} is a classifier; this trains gadgets for pair models (classifier gadgets: "
            "`prunecascade tuples --save-gadgets`)"
        )
    protos_cfg, prior = manifest.extra.get("prototypes"), manifest.extra.get("grade_prior")
    if not isinstance(protos_cfg, dict) or prior is None:
        raise ValueError(
            f"{manifest.ref}: its manifest names no training prototypes or grade prior to draw tuples from"
        )
    if len(prior) != model.spec.num_grades or model.spec.num_grades != 3:
        raise ValueError(f"{manifest.ref}: pair tuples need 3 grades and a prior over them, got {prior}")
    train_cfg = PrototypeConfig(**{**protos_cfg, "padding": tuple(protos_cfg["padding"])})
    val_cfg = replace(train_cfg, num_prototypes=max(200, train_cfg.num_prototypes // 5), seed=train_cfg.seed + 2000)
    train = sample_pair_tuples(make_prototypes(train_cfg, "train"), train_tuples, n_max, prior, seed * 3)
    val = sample_pair_tuples(make_prototypes(val_cfg, "val"), val_tuples, n_max, prior, seed * 3 + 1)
    out_train, out_val = pair_tuple_outputs_many([model], train)[0], pair_tuple_outputs_many([model], val)[0]
    config = GadgetTrainConfig(n_max=n_max, steps=steps, seed=seed)
    gadget = train_pair_gadget(kind, out_train, out_val, hidden_size=hidden_size, config=config)
    acc: dict[str, float] = {}
    for agg in (kind, "mean_logit"):  # the same validation tuples for both (same generator seed)
        g = torch.Generator().manual_seed(seed + 99)
        c = torch.randint(1, n_max + 1, (len(val),), generator=g)
        rows, y = _draw_outputs(out_val, c, g)
        log_post = aggregate(agg, rows, c, log_prior_of(torch.tensor(prior, dtype=torch.float64)), gadget)
        acc[agg] = float((log_post.argmax(1) == y).float().mean())
    record = {
        "trained_by": "prunecascade gadget",
        "tuples": {"train": train_tuples, "val": val_tuples, "n_max": n_max, "grade_prior": list(prior)},
        "steps": steps,
        "seed": seed,
        "val_n_accuracy": acc,
    }
    return gadget, record


def _draw_outputs(
    pool: PairTupleOutputs, counts: torch.Tensor, gen: torch.Generator
) -> tuple[MemberOutputs, torch.Tensor]:
    """Like `draw_from_pool`, with logits as well as hidden states (for evaluating every aggregator)."""
    t, m = pool.hidden.shape[:2]
    which = torch.randint(0, t, (len(counts),), generator=gen)
    order = torch.rand(len(counts), m, generator=gen).argsort(1)
    keep = torch.arange(m)[None, :] < counts[:, None]
    idx = (which[:, None].expand(-1, m), order)
    return MemberOutputs(pool.logits[idx][keep], pool.hidden[idx][keep]), pool.grades[which]
