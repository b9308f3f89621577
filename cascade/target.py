"""What a query wants, and how clusters are ranked for it.

A `Target` is a utility over a model's outputs (classes for a label or a utility, relevance grades for a query by
example) with the query the model reads; a cluster's score is its expected utility under the cluster's posterior.
Clusters are ranked by the utility's log-odds (`ranking_key`), which orders them as the expected utility does
without ties where a posterior saturates. The stage loop ranks and cuts a whole batch of queries at once
(`ranking_keys`, `top_per_query`), each query's clusters as if it were alone; the exact table and the dense
oracle rank with the same key."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.scorer import ScorerKind

__all__ = ["Target", "RANKING_KEYS", "ranking_key", "ranking_keys", "top_per_query"]

RANKING_KEYS = {
    "utility_log_odds": "log(E[u] - min u) - log(max u - E[u]) with E[u] = sum_o u_o p(o | cluster), u the utility "
    "over outputs (one-hot for a label: its log-odds; gains over grades for a query by example, from the cascade's "
    "or the cluster reader's grade posteriors): ranks as the expected utility `score` does, without ties where the "
    "posterior saturates",
    "negative_sq_distance": "minus the squared L2 distance from the query's embedding to the cluster centroid "
    "(FAISS only, no model stage)",
}


@dataclass(frozen=True)
class Target:
    """What the query wants: score(cluster) = sum_o utility[o] * p(o | query, cluster) over classes
    for a classifier target and over relevance grades for a query by example."""

    utility: np.ndarray
    kind: ScorerKind = "classifier"
    queries: tuple[torch.Tensor | None, ...] = (None,)
    """One (1, D) tensor per example for a pair model; `(None,)` for a classifier, which ignores the query."""
    candidates: np.ndarray | None = None  # None: every cluster
    candidate_distances: np.ndarray | None = None  # squared L2 in the embedding, for FAISS-only answers
    embeddings: np.ndarray | None = None
    """(examples, d) float32: the examples' embeddings stage 0 searched with, for the stages that read the
    retriever's score (the cluster reader's residual) without embedding the examples again."""
    label: int | None = None
    flops: int = 0  # what it cost to build the target (embedding the examples)

    @property
    def ranking(self) -> str:
        return "utility_log_odds"


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


def ranking_keys(log_post: torch.Tensor, targets: Sequence[Target], clusters_q: np.ndarray) -> torch.Tensor:
    """`ranking_key` for every query's clusters (concatenated, `clusters_q` each): one call per distinct utility."""
    groups: dict[bytes, list[int]] = defaultdict(list)
    for q, t in enumerate(targets):
        groups[np.asarray(t.utility, dtype=np.float64).tobytes()].append(q)
    if len(groups) == 1:
        return ranking_key(log_post, targets[0])
    starts = np.cumsum(clusters_q) - clusters_q
    out = torch.empty(len(log_post), dtype=torch.float64)
    for qs in groups.values():
        idx = torch.from_numpy(np.concatenate([np.arange(starts[q], starts[q] + clusters_q[q]) for q in qs]))
        out[idx] = ranking_key(log_post[idx], targets[qs[0]])
    return out


def top_per_query(keys: torch.Tensor, clusters_q: np.ndarray, keep: list[int]) -> list[np.ndarray]:
    """Per query, the positions (within its clusters) of its `keep[q]` best keys, best first: one topk over a
    (queries x clusters) view where the queries have as many clusters and keep as many."""
    starts = np.cumsum(clusters_q) - clusters_q
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(clusters_q)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for q, (c, n) in enumerate(zip(clusters_q, keep, strict=True)):
        groups[(int(c), n)].append(q)
    for (c, n), qs in groups.items():
        if len(qs) == 1 or c == 0:
            for q in qs:
                out[q] = torch.topk(keys[starts[q] : starts[q] + c], n).indices.numpy()
            continue
        block = keys[torch.from_numpy(np.concatenate([np.arange(starts[q], starts[q] + c) for q in qs]))]
        top = torch.topk(block.view(len(qs), c), n, dim=1).indices.numpy()
        for j, q in enumerate(qs):
            out[q] = top[j]
    return out
