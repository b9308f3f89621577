"""The cascade: candidates from the index, then per stage one batched scoring pass over the sampled members
of every surviving cluster, aggregation into cluster posteriors, scoring against the target, and a cut.

Every stage calls `score(query, items)` on its model (`models.scorer`), so one loop serves classifiers
(label and utility targets; the query is ignored) and pair models (queries by example; the query is read with
every item). A target says which kind of model can answer it; the stage list is checked against that once."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from cascade.config import Stage
from cascade.errors import RequestError
from cascade.snapshot import Snapshot, Variant
from cascade.space import sample_members
from models.aggregation import MemberOutputs, aggregate, get_aggregator
from models.inference import score_chunked
from models.scorer import ScorerKind, prepare_for

__all__ = [
    "Target",
    "StageReport",
    "CascadeResult",
    "stage_flops",
    "stage_log_posterior",
    "planned_stage_flops",
    "faiss_answer",
    "dense_oracle",
    "dense_flops",
    "ranking_key",
    "RANKING_KEYS",
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


def stage_flops(
    variant: Variant,
    aggregator: str,
    items: int,
    members: Mapping[int, int],
    num_outputs: int,
    examples: int = 1,
    prepared_for: int | None = None,
) -> tuple[int, int]:
    """(nonzero, dense-kernel) FLOPs of one stage, for every example: the model on `items` members (the query
    prepared before for `prepared_for` items and reused, or not), and the aggregation of clusters that have
    `members` = {members per cluster: clusters}. The stage loop counts what it ran with it; a plan
    (`cascade.plan`) predicts a stage with it before anything runs."""
    agg = get_aggregator(aggregator)
    aggregation = sum(clusters * agg.flops(n, num_outputs, variant.gadget) for n, clusters in members.items())
    cost = variant.cost(items, prepared_for=prepared_for)
    return examples * cost.nonzero + examples * aggregation, examples * cost.dense_kernel + examples * aggregation


def planned_stage_flops(snapshot: Snapshot, target: Target, k: int, stages: tuple[Stage, ...]) -> tuple[int, ...]:
    """Each stage's nonzero FLOPs as the stage loop (`cascade.stage_loop`) will count them (`stage_flops`),
    before anything runs: every surviving cluster is assumed to have at least `samples` members, so the figure
    is exact where they do and an upper bound otherwise. A stage of the same variant as the one before extends
    its members, as the loop does."""
    alive = len(target.candidates) if target.candidates is not None else snapshot.space.num_clusters
    max_size = int(snapshot.space.sizes.max()) if snapshot.space.num_clusters else 0
    costs = []
    previous: tuple[str, int, int] | None = None  # (variant, members per cluster, items prepared for)
    for i, stage in enumerate(stages):
        variant = snapshot.variants[stage.variant]
        n = min(stage.samples, max_size)
        if previous is not None and previous[0] == stage.variant:  # extends the members the stage before scored
            items, prepared_for = alive * max(n - previous[1], 0), previous[2]
            previous = (stage.variant, max(n, previous[1]), previous[2])
        else:
            items, prepared_for = alive * n, None
            previous = (stage.variant, n, alive * n)
        members = {previous[1]: alive} if alive and previous[1] else {}
        nonzero, _ = stage_flops(
            variant, stage.aggregator, items, members, len(variant.log_prior), len(target.queries), prepared_for
        )
        costs.append(nonzero)
        alive = k if i == len(stages) - 1 else min(stage.keep or k, alive)
    return tuple(costs)


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


def stage_log_posterior(
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


def faiss_answer(snapshot: Snapshot, target: Target, k: int) -> CascadeResult:
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
    cluster (for every example of a query by example), as the snapshot counted it once (`Snapshot.oracle_flops`)."""
    per_example = snapshot.oracle_flops.get(target.kind)
    if per_example is None:
        raise RequestError("target", f"no dense {target.kind} model is configured")
    return per_example * len(target.queries)


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
        log_post = stage_log_posterior(dense, ORACLE_AGGREGATOR, target.queries, x, counts_t, inputs=True)
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
