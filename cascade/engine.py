"""The cascade's answers: what a stage reports (`StageReport`), a ranking with its stages (`CascadeResult`), the
FAISS-only answer (stage 0 alone), and the dense exhaustive oracle every answer is measured against, with the
one-query scoring it runs (`stage_log_posterior`). The stage loop (`cascade.stage_loop`) produces the cascade's
results. What a query wants and how clusters are ranked (`cascade.target`) and the FLOPs (`cascade.costs`) have
their own modules."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cascade.snapshot import Snapshot, Variant
from cascade.space import sample_members
from cascade.target import Target, ranking_key
from models.aggregation import MemberOutputs, aggregate
from models.inference import score_chunked
from models.scorer import prepare_for

__all__ = [
    "StageReport",
    "CascadeResult",
    "stage_log_posterior",
    "faiss_answer",
    "dense_oracle",
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
