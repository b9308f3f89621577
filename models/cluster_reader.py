"""A cluster reader: a pair model that reads all of a candidate cluster's members together.

The shipped pair model scores one member at a time and the cascade averages the members' posteriors; on the
default space that never ranked better than its own retriever, which compares the query with a cluster's mean
embedding (docs/premise.md). A reader sees every member at once, so it can estimate the cluster's template and its
noise in the query's own coordinates before it compares:

- every query position p attends, within each member j separately, to that member's positions l (logits
  <W_q f_q(p), W_k f_j(l)> / sqrt(d) plus a learned bias of p - l, masked beyond `max_shift`): a soft alignment
  of each member to the query;
- the aligned member values are read together, by their mean m(p) and spread v(p) over members (`xattn`), and a
  small MLP of (W_v f_q, m, f_q - m, (f_q - m)^2, v, the members' mean alignment strength) scores each query
  position; the scores are summed. `maxsim` is the late-interaction variant: a learned scale times the mean
  alignment strength, summed.

Key = reader + alpha x the retriever's score. The MLP's last layer (and maxsim's scale) start at zero, so an
untrained reader ranks exactly as its retriever does. The item side (keys and values per member position,
`ClusterReader.item_side`) depends on the item alone and would be cached per cluster; what runs per pair is
`ClusterReader.forward`, counted by `flops_per_pair`.

Not served yet: lab/cluster_reader.py trains and measures it (lab/CLUSTER_READER.md, docs/performance.md 0).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.biencoder import BiEncoder

__all__ = ["MemberFeatures", "ClusterReader", "ReaderRanker", "listwise_loss", "FEATURES", "MODES"]

FEATURES = ("raw", "c1", "c2", "b2")
MODES = ("xattn", "maxsim")


class MemberFeatures(nn.Module):
    """Per-position features of a signal from a bi-encoder's first conv blocks (copied, so the reader may train
    them without touching the retriever): `raw` (the signal, 1 channel), `c1` (the signal and the first conv's ReLU
    output), `c2` (the second conv's ReLU output, half the positions), `b2` (after its pool, a quarter). Standardised
    per channel with constants measured once on `sample`."""

    def __init__(self, encoder: BiEncoder, feature: str, trainable: bool, sample: torch.Tensor) -> None:
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r} (known: {', '.join(FEATURES)})")
        self.feature = feature
        self.conv1 = copy.deepcopy(encoder.net[1])
        self.conv2 = copy.deepcopy(encoder.net[4])
        self.requires_grad_(trainable)
        with torch.no_grad():
            f = self._raw(sample)
        self.register_buffer("mean", f.mean((0, 1)))
        self.register_buffer("std", f.std((0, 1)) + 1e-3)

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        x1 = x[:, None]
        if self.feature == "raw":
            return x1.transpose(1, 2)
        h1 = F.relu(self.conv1(x1))
        if self.feature == "c1":
            return torch.cat([x1, h1], 1).transpose(1, 2)
        h2 = F.relu(self.conv2(F.max_pool1d(h1, 2)))
        if self.feature == "c2":
            return h2.transpose(1, 2)
        return F.max_pool1d(h2, 2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, L, C)."""
        return (self._raw(x) - self.mean) / self.std


class ClusterReader(nn.Module):
    """One score per (query, cluster) from the query's features and every member's (see the module)."""

    def __init__(self, channels: int, length: int, mode: str, d: int, dv: int, hidden: int, max_shift: int) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
        self.mode, self.d, self.dv, self.hidden, self.length = mode, d, dv, hidden, length
        self.q = nn.Linear(channels, d)
        self.k = nn.Linear(channels, d)
        self.v = nn.Linear(channels, dv)
        self.rel = nn.Parameter(torch.zeros(2 * length - 1))
        p = torch.arange(length)
        rel = p[:, None] - p[None, :]
        self.register_buffer("rel_idx", rel + length - 1)
        self.register_buffer("rel_mask", torch.where(rel.abs() <= max_shift, 0.0, -1e4))
        self.mlp = nn.Sequential(
            nn.Linear(5 * dv + 1, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.scale = nn.Parameter(torch.zeros(()))  # maxsim: starts at zero (the retriever's ranking)
        self.log_alpha = nn.Parameter(torch.zeros(()))

    def init_identity(self) -> None:
        """Query and key projections start as the identity on the first channels: the first alignments then
        follow feature similarity, from which the reader learns steadily (from a random start it did not learn in
        600 steps, lab/CLUSTER_READER.md)."""
        with torch.no_grad():
            for lin in (self.q, self.k):
                lin.weight.zero_()
                lin.bias.zero_()
                n = min(lin.weight.shape)
                lin.weight[:n, :n] = torch.eye(n)

    def item_side(self, fm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, n, L, C) member features -> keys (P, n, L, d), values (P, n, L, dv): what a cluster caches."""
        return self.k(fm), self.v(fm)

    def query_side(self, fq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, L, C) -> queries (P, L, d) scaled by 1/sqrt(d), values (P, L, dv)."""
        return self.q(fq) / math.sqrt(self.d), self.v(fq)

    def forward(self, qq: torch.Tensor, qv: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One score per pair: qq, qv (P, L, .), k, v (P, n, L, .). Symmetric in the members."""
        logits = torch.einsum("pqd,pnld->pnql", qq, k) + self.rel[self.rel_idx] + self.rel_mask
        lse = torch.logsumexp(logits, -1)  # (P, n, L): how well each member aligns at each query position
        if self.mode == "maxsim":
            return self.scale * lse.mean(1).sum(-1)
        aligned = torch.einsum("pnql,pnlv->pnqv", logits.softmax(-1), v)
        m = aligned.mean(1)
        spread = aligned.var(1, unbiased=False)
        diff = qv - m
        feats = torch.cat([qv, m, diff, diff.pow(2), spread, lse.mean(1)[..., None]], -1)
        return self.mlp(feats).squeeze(-1).sum(-1)

    def flops_per_pair(self, n: int) -> int:
        """Multiply-adds x 2 of what runs per (query, cluster) pair reading n members, from the layer shapes (item
        side cached, query side once per query)."""
        L, d, dv, hidden = self.length, self.d, self.dv, self.hidden
        att = n * L * L * (2 * d + 4)  # logits (+ bias), logsumexp, softmax
        if self.mode == "maxsim":
            return att + n * L + L
        att += n * L * L * 2 * dv  # aligned values
        att += n * L * dv * 3  # mean and spread over members
        mlp = L * 2 * ((5 * dv + 1) * hidden + hidden * hidden + hidden) + L * (4 * dv)
        return att + mlp


class ReaderRanker(nn.Module):
    """Features, reader and the retriever's score as a residual: the key a rerank sorts by."""

    def __init__(self, trunk: MemberFeatures, reader: ClusterReader) -> None:
        super().__init__()
        self.trunk, self.reader = trunk, reader
        self.residual = True

    def scores(self, q: torch.Tensor, members: torch.Tensor, retriever_score: torch.Tensor) -> torch.Tensor:
        """q (B, D), members (B, G, n, D), retriever_score (B, G) -> keys (B, G) (the reader alone when
        `residual` is off)."""
        b, g, n, dim = members.shape
        fq = self.trunk(q)
        fm = self.trunk(members.reshape(-1, dim))
        fm = fm.reshape(b * g, n, *fm.shape[1:])
        qq, qv = self.reader.query_side(fq)
        k, v = self.reader.item_side(fm)
        rep = torch.arange(b).repeat_interleave(g)
        s = self.reader(qq[rep], qv[rep], k, v).reshape(b, g)
        return s + self.reader.log_alpha.exp() * retriever_score if self.residual else s


def listwise_loss(keys: torch.Tensor) -> torch.Tensor:
    """Localized contrastive estimation: softmax cross-entropy over each group's keys (B, G), the query's own
    cluster first."""
    return F.cross_entropy(keys, torch.zeros(len(keys), dtype=torch.long, device=keys.device))
