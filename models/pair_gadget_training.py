"""Pair tuples and gadget training for pair models: what `prunecascade gadget` runs to build the LSTM / deep-sets
gadget a served stage `{"variant": ..., "aggregator": "lstm"}` uses.

A pair tuple is a query q, a cluster whose grade g for q is known, and n of its members. The shared label of the
tuple is the grade: every member of a cluster has the cluster's grade for q (clusters are views of one prototype,
`models.prototypes`). The pair model scores (q, member) for each member and a gadget turns the n hidden states
into one grade posterior, exactly as a cascade stage does for one candidate cluster. This module samples such
tuples, computes a pair model's outputs on them, trains gadgets on the hidden states with the model frozen, and
stores a gadget beside its pair model after checking it fits. The n-accuracy / RI experiment over these tuples
is in `lab.pair_tuples`.

Sampling: a query prototype, then g ~ grade prior, then the cluster: the query's own prototype (g = 2), another
prototype of the same digit (g = 1; a `hard_fraction` of them among its most similar prototypes, as in pair
training) or a prototype of another digit (g = 0); the query and the n_max members are fresh views (never stored
items; members are exchangeable with a cluster's stored views). A tuple of size n < n_max uses its first n
members, so the tuples of every n share queries and clusters (paired comparisons over n).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from models.aggregation import MemberOutputs, aggregate, log_prior_of
from models.gadget import GADGET_KINDS, Gadget, GadgetSpec, gadget_misfit
from models.gadget_training import GadgetTrainConfig, TupleDraw, train_gadget_on
from models.pair import PairNetwork
from models.pair_training import sample_pair_ids
from models.prototypes import PrototypeConfig, Prototypes, make_prototypes, make_views, similar_prototypes
from models.registry import ModelRegistry

__all__ = [
    "PairTuples",
    "PairTupleOutputs",
    "sample_pair_tuples",
    "pair_tuple_outputs",
    "pair_tuple_outputs_many",
    "draw_from_pool",
    "train_pair_gadget",
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
    """A gadget-training draw (`models.gadget_training.TupleDraw`) from precomputed pool tuples: each requested tuple of
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
    if kind not in GADGET_KINDS:
        raise ValueError(f"kind must be one of {', '.join(GADGET_KINDS)}, got {kind!r}")
    loaded = registry.load(name, version)
    model, manifest = loaded.model, loaded.manifest
    if not isinstance(model, PairNetwork):
        raise ValueError(
            f"{manifest.ref} is a classifier; this trains gadgets for pair models (classifier gadgets: "
            "`python -m lab.run_tuples --save-gadgets`)"
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
