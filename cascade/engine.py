"""The cascade: candidates from the index, then per stage one batched scoring pass over the sampled members
of every surviving cluster, aggregation into cluster posteriors, scoring against the target, and a cut.

Every stage calls `score(query, items)` on its model (`models.scorer`), so one loop serves classifiers
(label and utility targets; the query is ignored) and pair models (queries by example; the query is read with
every item). A target says which kind of model can answer it; the stage list is checked against that once."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cascade.config import Stage, scale_keeps
from cascade.queries import default_gains
from cascade.snapshot import Snapshot, StageError, Variant
from cascade.space import sample_members
from models.aggregation import MemberOutputs, aggregate, get_aggregator
from models.inference import score_chunked
from models.scorer import ScorerKind, prepare_for

__all__ = [
    "Target",
    "StageReport",
    "CascadeResult",
    "run_cascade",
    "dense_oracle",
    "target_from_label",
    "target_from_utility",
    "target_from_examples",
    "dense_flops",
    "plan_flops",
    "ranking_key",
    "RANKING_KEYS",
    "resolve_stages",
    "DeadlineExceeded",
    "ORACLE_AGGREGATOR",
]

ORACLE_AGGREGATOR = "mean_logit"
"""How the exhaustive oracle (and the exact table, which must equal it) turns every member's output into a cluster
posterior: the softmax of the members' mean logits. Unlike `bayes` over every member, its confidence does not grow
with the cluster's size, so a large cluster does not outrank an equally relevant small one, and a cascade that reads
a sample of members estimates it without bias (docs/aggregation.md, "What the dense oracle ranks by")."""


class DeadlineExceeded(TimeoutError):
    """The query's deadline (`time.monotonic()` seconds) passed between two stages: the rest is not computed."""


RANKING_KEYS = {
    "utility_log_odds": "log(E[u] - min u) - log(max u - E[u]) with E[u] = sum_o u_o p(o | cluster), u the utility "
    "over outputs (one-hot for a label: its log-odds; gains over grades for a query by example): ranks as the "
    "expected utility `score` does, without ties where the posterior saturates",
    "negative_sq_distance": "minus the squared L2 distance from the query's embedding to the cluster centroid "
    "(FAISS only, no model stage)",
}


@dataclass(frozen=True)
class Target:
    """What the query wants: score(cluster) = sum_o utility[o] * p(o | query, cluster) (research notes 2), over
    classes for a classifier target and over relevance grades for a query by example."""

    utility: np.ndarray
    kind: ScorerKind = "classifier"
    queries: tuple[torch.Tensor | None, ...] = (None,)
    """One (1, D) tensor per example for a pair model; `(None,)` for a classifier, which ignores the query."""
    candidates: np.ndarray | None = None  # None: every cluster
    candidate_distances: np.ndarray | None = None  # squared L2 in the embedding, for FAISS-only answers
    label: int | None = None
    flops: int = 0  # what it cost to build the target (embedding the examples)

    @property
    def ranking(self) -> str:
        return "utility_log_odds"


@dataclass(frozen=True)
class StageReport:
    variant: str
    version: int
    aggregator: str
    clusters_in: int
    kept: int
    samples: int
    items: int
    flops: int
    flops_dense_kernel: int
    ms: float


@dataclass(frozen=True)
class CascadeResult:
    cluster_ids: np.ndarray
    scores: np.ndarray  # expected utility under the final posterior (or -distance for FAISS only)
    posteriors: np.ndarray  # (k, outputs); (k, 0) for FAISS only
    stages: list[StageReport] = field(default_factory=list)
    snapshot_id: str = ""
    ranking_values: np.ndarray | None = None  # what the ranking used (`ranking`), best first
    ranking: str = "utility_log_odds"

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.stages)

    @property
    def flops_dense_kernel(self) -> int:
        return sum(s.flops_dense_kernel for s in self.stages)


def target_from_label(snapshot: Snapshot, label: int) -> Target:
    """`label` is one of the user's labels (`Space.labels_known`); the target is over class indices."""
    space = snapshot.space
    index = space.class_of(label)
    if index is None:
        known = ", ".join(str(v) for v in space.labels_known)
        raise StageError("target.label", f"unknown label {label}; this space's labels are {known}")
    utility = np.zeros(space.num_classes)
    utility[index] = 1.0
    return Target(utility=utility, label=index)


def target_from_utility(snapshot: Snapshot, utility: list[float] | np.ndarray) -> Target:
    u = np.asarray(utility, dtype=np.float64)
    if u.shape != (snapshot.space.num_classes,):
        raise StageError("target.utility", f"needs {snapshot.space.num_classes} values, got {u.size}")
    if not np.isfinite(u).all():
        raise StageError("target.utility", "values must be finite")
    if not (u != 0).any():
        raise StageError("target.utility", "all weights are zero: every cluster would score 0")
    return Target(utility=u)


def _examples_array(snapshot: Snapshot, examples: list[list[float]] | np.ndarray) -> np.ndarray:
    try:
        x = np.asarray(examples, dtype=np.float32)
    except (ValueError, TypeError):
        raise StageError("target.examples", "every example must be a list of numbers of the same length") from None
    if x.ndim != 2 or x.shape[1] != snapshot.space.input_dim or len(x) == 0:
        got = f"; got {x.shape[1]}" if x.ndim == 2 else ""
        raise StageError("target.examples", f"each example needs {snapshot.space.input_dim} features{got}")
    if not np.isfinite(x).all():
        raise StageError("target.examples", "values must be finite")
    return x


def target_from_examples(
    snapshot: Snapshot,
    examples: list[list[float]] | np.ndarray,
    candidates: int,
    gains: list[float] | tuple[float, ...] | None = None,
) -> Target:
    """A query by example. With a pair model in the snapshot (the main path): the examples are the query,
    read by the pair models with every item, the utility is `gains` over relevance grades, and the candidates
    are the clusters nearest to the examples in the bi-encoder's embedding. Several examples: each cluster's
    grade posterior is the mean over examples, at a cost proportional to their number.

    Without one (an older home): the dense classifier's mean posterior over the examples is a utility over
    classes and the candidates come from the raw-feature index."""
    x = _examples_array(snapshot, examples)
    if snapshot.embedding is None or snapshot.config.pair_dense is None:
        if gains is not None:
            raise StageError("target.gains", "this space has no pair model, so no relevance grades")
        dense = snapshot.dense
        with torch.inference_mode():
            utility = score_chunked(dense.model, None, torch.from_numpy(x))[0].softmax(1).mean(0).double().numpy()
        nearest = snapshot.index.nearest_clusters(x, candidates)
        return Target(utility=utility, candidates=nearest, flops=len(x) * dense.flops.nonzero)
    num_grades = snapshot.num_grades
    g = np.asarray(default_gains(num_grades) if gains is None else gains, dtype=np.float64)
    if g.shape != (num_grades,) or not np.isfinite(g).all():
        raise StageError("target.gains", f"needs {num_grades} finite values, one per relevance grade; got {g.size}")
    if not (g != 0).any():
        raise StageError("target.gains", "all gains are zero: every cluster would score 0")
    nearest, distances = snapshot.embedding.candidates(x, candidates)
    queries = tuple(torch.from_numpy(row[None, :].copy()) for row in x)
    return Target(
        utility=g,
        kind="pair",
        queries=queries,
        candidates=nearest,
        candidate_distances=distances,
        flops=len(x) * snapshot.embedding.flops_per_query,
    )


def ranking_key(log_post: torch.Tensor, target: Target) -> torch.Tensor:
    """What clusters are ranked by: the log-odds of the utility, log(E[u] - min u) - log(max u - E[u]), computed
    from log posteriors. It ranks exactly as the expected utility E[u] = u . p does (it is increasing in it), but
    a probability that saturates at 1.0 in float64 (hundreds of confident clusters) or sits at 0 no longer ties:
    both the excess over the worst output and the shortfall from the best are sums of small probabilities,
    computed in log space. For a label (one-hot u) it is the label's log-odds."""
    lp = log_post.double()
    u = torch.from_numpy(target.utility).double()
    low, high = u - u.min(), u.max() - u
    if not bool((high > 0).any()):  # every output is worth the same: nothing to rank by
        return torch.zeros(len(lp), dtype=torch.float64)
    excess = torch.logsumexp(lp[:, low > 0] + low[low > 0].log(), dim=1)
    shortfall = torch.logsumexp(lp[:, high > 0] + high[high > 0].log(), dim=1)
    return excess - shortfall


def _aggregator_flops(name: str, counts: np.ndarray, num_outputs: int, gadget: torch.nn.Module | None) -> int:
    agg = get_aggregator(name)
    times = np.bincount(counts)  # clusters per member count (counts are small): cheaper than np.unique
    values = np.flatnonzero(times)
    return int(sum(int(times[n]) * agg.flops(int(n), num_outputs, gadget) for n in values))


def resolve_stages(
    snapshot: Snapshot, target: Target, k: int, stages: tuple[Stage, ...] | list[Stage] | None
) -> tuple[Stage, ...]:
    """The stages a query runs: its own (checked as given), or the default cascade for the target's kind with
    its keeps scaled to k. An empty list is a FAISS-only answer (queries by example only)."""
    if stages is None:
        try:
            default = snapshot.config.stages_for(target.kind)
        except LookupError as exc:
            raise StageError("target", str(exc)) from None
        stages = scale_keeps(default, k, snapshot.config.reference_k)
    stages = tuple(stages)
    if not stages and target.candidates is None:
        raise StageError("stages", "an empty stage list (FAISS only) needs a query by example")
    if stages:
        snapshot.validate_stages(stages, k, target.kind)
    return stages


def _candidates(snapshot: Snapshot, target: Target) -> np.ndarray:
    return target.candidates if target.candidates is not None else np.arange(snapshot.space.num_clusters)


def plan_flops(
    snapshot: Snapshot, target: Target, k: int, stages: tuple[Stage, ...] | list[Stage] | None = None
) -> int:
    """An upper bound on a query's FLOPs from its stage plan, before anything runs (for the cost budget):
    every surviving cluster is assumed to have at least `samples` members."""
    stages = resolve_stages(snapshot, target, k, stages)
    alive = len(_candidates(snapshot, target))
    total = target.flops
    max_size = int(snapshot.space.sizes.max()) if snapshot.space.num_clusters else 0
    previous: tuple[str, int, int] | None = None  # (variant, members per cluster, items prepared for)
    for i, stage in enumerate(stages):
        variant = snapshot.variants[stage.variant]
        n = min(stage.samples, max_size)
        outputs = len(variant.log_prior)  # the elementwise aggregators' share; a gadget's is small beside it
        if previous is not None and previous[0] == stage.variant:  # extends the members the stage before scored
            cost = variant.cost(alive * max(n - previous[1], 0), prepared_for=previous[2])
            previous = (stage.variant, max(n, previous[1]), previous[2])
        else:
            cost = variant.cost(alive * n)
            previous = (stage.variant, n, alive * n)
        total += (cost.nonzero + alive * previous[1] * outputs) * len(target.queries)
        alive = k if i == len(stages) - 1 else min(stage.keep or k, alive)
    return total


def run_cascade(
    snapshot: Snapshot,
    target: Target,
    k: int,
    stages: tuple[Stage, ...] | list[Stage] | None = None,
    seed: int = 0,
    deadline: float | None = None,
) -> CascadeResult:
    """`deadline`: a `time.monotonic()` instant; past it, the next stage raises DeadlineExceeded instead of
    running (the service has answered 504 by then and wants its worker back)."""
    alive = _candidates(snapshot, target)
    if not 1 <= k <= len(alive):
        raise StageError("k", f"must be between 1 and the {len(alive)} candidate clusters, got {k}")
    stages = resolve_stages(snapshot, target, k, stages)
    if not stages:
        return _faiss_only(snapshot, target, k)
    space = snapshot.space
    rng = np.random.default_rng(seed)
    utility = torch.from_numpy(target.utility).double()
    reports: list[StageReport] = []
    scores = posteriors = keys = torch.empty(0)
    scored: _Scored | None = None
    for i, stage in enumerate(stages):
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(f"deadline passed before stage {i} ({stage.variant})")
        started = time.perf_counter()
        variant = snapshot.variants[stage.variant]
        extend = scored is not None and scored.variant == stage.variant
        if extend:  # the same model as the stage before: score only members it has not scored yet
            assert scored is not None
            rows, new_counts = _extend_members(space.offsets, alive, scored.rows, scored.counts, stage.samples, rng)
        else:
            rows, new_counts = sample_members(space.offsets, alive, stage.samples, rng)
        with torch.inference_mode():
            # the rows' item inputs: raw features, or a pair model's cached trunk features (index_select: ~2x
            # faster than fancy indexing)
            x = snapshot.item_inputs(variant, torch.from_numpy(rows))
            prepared = scored.prepared if extend and scored is not None else None
            outputs, prepared = _score_members(variant, target.queries, x, prepared)
            if extend and scored is not None:
                merged = _merge_members(scored, rows, new_counts, outputs)
            else:
                merged = _Scored(stage.variant, rows, new_counts, outputs, prepared, len(rows))
            counts = merged.counts
            log_post = _aggregate_examples(variant, stage.aggregator, merged.outputs, torch.from_numpy(counts))
            post = log_post.double().exp()
            cluster_scores = post @ utility
            n_keep = k if i == len(stages) - 1 else min(stage.keep or k, len(alive))
            stage_keys = ranking_key(log_post, target)
            top = torch.topk(stage_keys, n_keep).indices
        clusters_in = len(alive)
        alive = alive[top.numpy()]
        following = stages[i + 1].variant if i + 1 < len(stages) else None
        scored = _keep_groups(merged, top.numpy()) if following == stage.variant else None
        scores, posteriors, keys = cluster_scores[top], post[top], stage_keys[top]
        examples = len(target.queries)
        agg_flops = examples * _aggregator_flops(stage.aggregator, counts, post.shape[1], variant.gadget)
        # per example: a pair model's query trunk and fold (if it folds; not again when extending), the pairs
        cost = variant.cost(len(rows), prepared_for=merged.prepared_for if extend else None)
        reports.append(
            StageReport(
                variant=variant.name,
                version=variant.version,
                aggregator=stage.aggregator,
                clusters_in=clusters_in,
                kept=len(alive),
                samples=stage.samples,
                items=len(rows),
                flops=examples * cost.nonzero + agg_flops,
                flops_dense_kernel=examples * cost.dense_kernel + agg_flops,
                ms=(time.perf_counter() - started) * 1000.0,
            )
        )
    return CascadeResult(
        cluster_ids=alive,
        scores=scores.numpy(),
        posteriors=posteriors.float().numpy(),
        stages=reports,
        snapshot_id=snapshot.id,
        ranking_values=keys.double().numpy(),
        ranking=target.ranking,
    )


@dataclass(frozen=True)
class _Scored:
    """The members a stage scored, grouped by cluster, with their outputs per example: a next stage of the
    same variant extends them instead of scoring them again (and reuses the prepared queries)."""

    variant: str
    rows: np.ndarray
    counts: np.ndarray
    outputs: list[tuple[torch.Tensor, torch.Tensor]]  # per example: (logits, hidden), in the order of rows
    prepared: list[object]  # per example: what `prepare` returned
    prepared_for: int  # the number of items the queries were prepared for (a pair model's path)


def _score_members(
    variant: Variant,
    queries: tuple[torch.Tensor | None, ...],
    x: torch.Tensor,
    prepared: list[object] | None = None,
    *,
    inputs: bool = True,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[object]]:
    """(logits, hidden) of the members per example, and the prepared queries (reused when given)."""
    outputs, used = [], []
    for j, query in enumerate(queries):
        p = prepare_for(variant.model, query, len(x)) if prepared is None else prepared[j]
        outputs.append(score_chunked(variant.model, query, x, inputs=inputs, prepared=p))
        used.append(p)
    return outputs, used


def _aggregate_examples(
    variant: Variant, aggregator: str, outputs: list[tuple[torch.Tensor, torch.Tensor]], counts: torch.Tensor
) -> torch.Tensor:
    """Cluster log posteriors: per example, aggregate the members; with several examples, the log of the mean
    posterior over examples."""
    total: torch.Tensor | None = None
    for logits, hidden in outputs:
        log_post = aggregate(aggregator, MemberOutputs(logits, hidden), counts, variant.log_prior, variant.gadget)
        log_post = log_post.double()
        total = log_post if total is None else torch.logaddexp(total, log_post)
    assert total is not None
    return total - math.log(len(outputs)) if len(outputs) > 1 else total


def _stage_log_posterior(
    variant: Variant,
    aggregator: str,
    queries: tuple[torch.Tensor | None, ...],
    x: torch.Tensor,
    counts: torch.Tensor,
    *,
    inputs: bool = False,
) -> torch.Tensor:
    """Cluster log posteriors of one stage: per example, score the members and aggregate them; with several
    examples, the log of the mean posterior over examples. `x`: the members' raw features, or with
    `inputs=True` their item inputs (`Snapshot.item_inputs`: a pair model's cached trunk features)."""
    outputs, _ = _score_members(variant, queries, x, inputs=inputs)
    return _aggregate_examples(variant, aggregator, outputs, counts)


def _group_index(counts: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Positions, in a grouped array with these counts, of the members of `groups` (in that order)."""
    starts = np.cumsum(counts) - counts
    sel = counts[groups]
    seg = np.repeat(np.arange(len(groups)), sel)
    return (starts[groups][seg] + np.arange(int(sel.sum())) - (np.cumsum(sel) - sel)[seg]).astype(np.int64)


def _keep_groups(scored: _Scored, groups: np.ndarray) -> _Scored:
    """The scored members of the surviving clusters only, in their new order."""
    idx = _group_index(scored.counts, groups)
    t = torch.from_numpy(idx)
    outputs = [(logits[t], hidden[t]) for logits, hidden in scored.outputs]
    return _Scored(
        scored.variant, scored.rows[idx], scored.counts[groups], outputs, scored.prepared, scored.prepared_for
    )


def _extend_members(
    offsets: np.ndarray, clusters: np.ndarray, rows: np.ndarray, counts: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """New members for each cluster (grouped, in the order of `clusters`) so that, with the `counts[c]` already
    scored ones (`rows`, grouped alike), it has min(n, size) members; uniform among those not yet scored. A
    cluster that already has n or more keeps them all and gets none."""
    starts = offsets[clusters]
    sizes = offsets[clusters + 1] - starts
    need = np.maximum(np.minimum(sizes, n) - counts, 0)
    if len(clusters) == 0 or not need.any():
        return np.empty(0, dtype=np.int64), need
    widest = int(sizes.max())
    keys = rng.random((len(clusters), widest))
    keys[np.arange(widest)[None, :] >= sizes[:, None]] = np.inf  # padding
    seg = np.repeat(np.arange(len(clusters)), counts)
    keys[seg, rows - starts[seg]] = np.inf  # already scored
    order = np.argsort(keys, axis=1, kind="stable")
    take = np.arange(widest)[None, :] < need[:, None]
    return (starts[:, None] + order)[take].astype(np.int64), need


def _merge_members(
    scored: _Scored, rows: np.ndarray, counts: np.ndarray, outputs: list[tuple[torch.Tensor, torch.Tensor]]
) -> _Scored:
    """The kept members and the new ones, grouped by cluster (the kept first in each)."""
    clusters = np.concatenate(
        [np.repeat(np.arange(len(counts)), scored.counts), np.repeat(np.arange(len(counts)), counts)]
    )
    order = np.argsort(clusters, kind="stable")
    t = torch.from_numpy(order)
    merged = [
        (torch.cat([a[0], b[0]])[t], torch.cat([a[1], b[1]])[t]) for a, b in zip(scored.outputs, outputs, strict=True)
    ]
    all_rows = np.concatenate([scored.rows, rows])[order]
    return _Scored(scored.variant, all_rows, scored.counts + counts, merged, scored.prepared, scored.prepared_for)


def _faiss_only(snapshot: Snapshot, target: Target, k: int) -> CascadeResult:
    """Stage 0 alone: the k candidates nearest in the embedding, scored by minus their squared distance."""
    assert target.candidates is not None and target.candidate_distances is not None
    values = -target.candidate_distances[:k]
    return CascadeResult(
        cluster_ids=target.candidates[:k],
        scores=values,
        posteriors=np.zeros((min(k, len(target.candidates)), 0), dtype=np.float32),
        stages=[],
        snapshot_id=snapshot.id,
        ranking_values=values,
        ranking="negative_sq_distance",
    )


def dense_flops(snapshot: Snapshot, target: Target) -> int:
    """What the dense exhaustive oracle costs for this target: the dense model on every member of every
    cluster (for every example of a query by example)."""
    dense = snapshot.dense_for(target.kind)
    return dense.cost(int(snapshot.space.sizes.sum())).nonzero * len(target.queries)


def dense_oracle(snapshot: Snapshot, target: Target, k: int) -> CascadeResult:
    """The dense model on every member of every cluster, aggregated by `ORACLE_AGGREGATOR`, run with the same
    chunked scoring as the cascade's stages so that wall-time ratios compare like with like. It ignores the
    index's candidates: it is what exhaustive scoring would answer."""
    started = time.perf_counter()
    space = snapshot.space
    alive = np.arange(space.num_clusters)
    widest = int(space.sizes.max())
    rows, counts = sample_members(space.offsets, alive, widest, np.random.default_rng(0))
    dense = snapshot.dense_for(target.kind)
    with torch.inference_mode():  # from the same cached item inputs as the stages: no slower than we can make it
        x = snapshot.item_inputs(dense, torch.from_numpy(rows))
        counts_t = torch.from_numpy(counts)
        log_post = _stage_log_posterior(dense, ORACLE_AGGREGATOR, target.queries, x, counts_t, inputs=True)
        post = log_post.exp()
        scores = post @ torch.from_numpy(target.utility).double()
        keys = ranking_key(log_post, target)
        top = torch.topk(keys, min(k, len(alive))).indices
    examples = len(target.queries)
    cost = dense.cost(len(rows))
    report = StageReport(
        variant=dense.name,
        version=dense.version,
        aggregator=ORACLE_AGGREGATOR,
        clusters_in=len(alive),
        kept=len(top),
        samples=widest,
        items=len(rows),
        flops=examples * cost.nonzero,
        flops_dense_kernel=examples * cost.dense_kernel,
        ms=(time.perf_counter() - started) * 1000.0,
    )
    return CascadeResult(
        alive[top.numpy()],
        scores[top].numpy(),
        post[top].float().numpy(),
        [report],
        snapshot.id,
        ranking_values=keys[top].double().numpy(),
        ranking=target.ranking,
    )
