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
  alignment strength, summed. `rigid` aligns each member by one soft shift for all its positions (a correlation
  over shifts, as the exact likelihood does) instead of a position each, and reads the members' shifts too.

The lab's options (`context`, `nearest`, `shift`, `upsample`: more inputs to the MLP, members at sub-sample
resolution) are measured in lab/CLUSTER_READER.md; the served recipe reads the residual through `context` (a conv
over its positions), the others are off.

Key = reader + alpha x the retriever's score. The MLP's last layer (and maxsim's scale) start at zero, so an
untrained reader ranks exactly as its retriever does. The item side (keys and values per member position,
`ClusterReader.item_side`) depends on the item alone and would be cached per cluster; what runs per pair is
`ClusterReader.forward`, counted by `flops_per_pair`.

Served as the last stage over FAISS's top candidates when it beats FAISS alone on dev queries
(`cascade.reader`, `cascade.reader_gate`); trained by `models.cluster_reader_training`, stored by
`models.cluster_reader_store`; lab/cluster_reader.py measures it (lab/CLUSTER_READER.md, docs/performance.md 0).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.biencoder import BiEncoder, BiEncoderSpec

__all__ = [
    "ReaderSpec",
    "MemberFeatures",
    "ShiftAlignment",
    "ClusterReader",
    "ReaderRanker",
    "build_ranker",
    "listwise_loss",
    "FEATURES",
    "MODES",
    "FIRST_SERVED_SHAPE",
]

FEATURES = ("raw", "c1", "c2", "b2")
MODES = ("xattn", "maxsim", "rigid", "template")
FIRST_SERVED_SHAPE = {"d": 32, "dv": 16, "hidden": 64, "context": 0}
"""The widths served first, the defaults of every stored spec written before they changed: a field a stored spec
lacks means its value here."""


@dataclass(frozen=True)
class ReaderSpec:
    """Everything that shapes a reader: the bi-encoder its features come from (only its first convs are used),
    which features, and the reader's widths. Stored as JSON beside its weights."""

    encoder: dict[str, Any]
    feature: str = "c1"
    mode: str = "xattn"
    d: int = 33
    dv: int = 32
    hidden: int = 128
    max_shift: int = 12
    context: int = 7
    """The served shape: twice the widths of `FIRST_SERVED_SHAPE` and a conv over the residual's positions. At
    16,000 steps on the default space, dev recall@1 0.776 against 0.764 for the first shape, and on 1,000 fresh
    dev queries 0.784 against 0.738 (docs/performance.md, lab/CLUSTER_READER.md); 2.7x the FLOPs per pair."""
    nearest: bool = False
    shift: bool = False
    upsample: int = 1

    kind = "cluster-reader"

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise ValueError(f"unknown feature {self.feature!r} (known: {', '.join(FEATURES)})")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (known: {', '.join(MODES)})")
        if min(self.d, self.dv, self.hidden) < 1 or self.max_shift < 0:
            raise ValueError("d, dv and hidden must be positive and max_shift at least 0")
        if self.upsample < 1:
            raise ValueError("upsample must be at least 1")
        if self.context < 0 or (self.context and self.context % 2 == 0):
            raise ValueError("context must be 0 (none) or an odd kernel size")
        BiEncoderSpec.from_dict(self.encoder)  # raises naming the problem

    @property
    def input_dim(self) -> int:
        return int(self.encoder["input_dim"])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReaderSpec:
        d = dict(d)
        if d.pop("kind", cls.kind) != cls.kind:
            raise ValueError("not a cluster reader spec")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown cluster reader spec keys: {sorted(unknown)}")
        return cls(**{**FIRST_SERVED_SHAPE, **d})


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
        self.input_dim = int(sample.shape[1])
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


class ShiftAlignment(nn.Module):
    """One soft shift for all positions of a signal of `length` positions, within +-`max_shift`: the score of each
    shift from a matrix of logits between two signals' positions (its diagonal's mean), and the (length x length)
    matrix that moves a signal by a softmax over shifts (Toeplitz, its rows renormalised where a shift leaves the
    signal). `rigid` aligns members to the query with it, `template` members to each other."""

    def __init__(self, length: int, max_shift: int) -> None:
        super().__init__()
        self.max_shift = max_shift
        shifts = torch.arange(-max_shift, max_shift + 1)
        pos = torch.arange(length)
        target = pos[None, :] + shifts[:, None]  # (S, L): the position that position p meets at shift s
        valid = (target >= 0) & (target < length)
        self.register_buffer("diag_idx", pos[None, :] * length + target.clamp(0, length - 1), persistent=False)
        self.register_buffer("diag_w", valid.float() / valid.sum(1, keepdim=True), persistent=False)
        offset = pos[None, :] - pos[:, None]  # (L, L): l - p
        self.register_buffer("toeplitz_idx", (offset + max_shift).clamp(0, 2 * max_shift), persistent=False)
        self.register_buffer("toeplitz_mask", (offset.abs() <= max_shift).float(), persistent=False)
        self.register_buffer("shifts", shifts.float(), persistent=False)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., L, L) logits between positions p and l -> (..., S): the mean over p of the logit (p, p + s)."""
        return (logits.flatten(-2)[..., self.diag_idx] * self.diag_w).sum(-1)

    def matrix(self, weights: torch.Tensor) -> torch.Tensor:
        """(..., S) weights over shifts -> (..., L, L): row p weighs position l by w(l - p)."""
        moved = weights[..., self.toeplitz_idx] * self.toeplitz_mask
        return moved / moved.sum(-1, keepdim=True).clamp_min(1e-6)


class ClusterReader(nn.Module):
    """One score per (query, cluster) from the query's features and every member's (see the module)."""

    def __init__(
        self,
        channels: int,
        length: int,
        mode: str,
        d: int,
        dv: int,
        hidden: int,
        max_shift: int,
        context: int = 0,
        nearest: bool = False,
        shift: bool = False,
        upsample: int = 1,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
        self.mode, self.d, self.dv, self.hidden, self.length = mode, d, dv, hidden, length
        self.q = nn.Linear(channels, d)
        self.k = nn.Linear(channels, d)
        self.v = nn.Linear(channels, dv)
        # upsample: members' keys and values are interpolated to `upsample` points per sample (cached so), so that
        # an alignment can move a member by a fraction of a sample rather than blur two neighbours
        self.upsample = upsample
        self.item_length = upsample * (length - 1) + 1
        span = upsample * (length - 1)
        self.rel = nn.Parameter(torch.zeros(2 * span + 1))
        rel = torch.arange(length)[:, None] * upsample - torch.arange(self.item_length)[None, :]  # in 1/upsample
        self.register_buffer("rel_idx", rel + span)
        self.register_buffer("rel_mask", torch.where(rel.abs() <= max_shift * upsample, 0.0, -1e4))
        self.context = context
        if context:
            # A conv over query positions of the residual f_q - m: neighbouring residuals are correlated where
            # the noise is smooth, and a per-position score cannot undo that. Starts as the identity.
            self.whiten = nn.Conv1d(dv, dv, context, padding=context // 2)
            with torch.no_grad():
                self.whiten.weight.zero_()
                self.whiten.bias.zero_()
                self.whiten.weight[:, :, context // 2] = torch.eye(dv)
        # nearest: per position and channel, the smallest squared difference between the query and any one
        # aligned member (a member with the query's own jitter matches it closely; a mean over members blurs it)
        self.nearest = nearest
        # shift: how far each query position's alignment moved, averaged over members, with its square and its
        # spread over members. Aligning absorbs the difference in position between query and cluster; without it
        # the MLP compares aligned values only and cannot tell a cluster shifted by a few samples from its own.
        self.shift = shift
        self.register_buffer("rel_pos", rel.float() / (4.0 * upsample), persistent=False)  # in 4 samples
        self.width = (5 + (2 if context else 0) + (1 if nearest else 0)) * dv + 1 + (3 if shift else 0)
        if mode == "template":
            # template: the members are first aligned to each other (a soft shift each, by correlation with their
            # mean, twice), at `upsample` points a sample; their mean and spread are the cluster's template, which
            # the query then reads as `xattn` reads one member. Lab only.
            if context or nearest or shift:
                raise ValueError("template reads one template, without context, nearest or shift")
            self.member_alignment = ShiftAlignment(self.item_length, 4 * upsample)
            self.align_scale = nn.Parameter(torch.ones(()))
        if mode == "rigid":
            # rigid: member j moves by one soft shift s for all its positions. c_j(s), the mean over query positions
            # p of the logit (p, p + s), scores each shift; a learned prior over shifts is added and a softmax over
            # s gives the weights w_j(s), so that the member aligned to the query is sum_s w_j(s) v_j(p + s): the
            # attention matrix is Toeplitz. A per-position alignment can warp a look-alike a few percent wider or
            # two samples off onto the query; one shift per member cannot.
            if upsample != 1 or context or nearest or shift:
                raise ValueError("rigid reads members at their own resolution, without context, nearest or shift")
            self.query_alignment = ShiftAlignment(length, max_shift)
            self.shift_prior = nn.Parameter(torch.zeros(2 * max_shift + 1))
            self.width = 5 * dv + 1 + 3
        self.mlp = nn.Sequential(
            nn.Linear(self.width, hidden),
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
        """(P, n, L, C) member features -> keys (P, n, L', d), values (P, n, L', dv), L' = `item_length`: what a
        cluster caches."""
        k, v = self.k(fm), self.v(fm)
        if self.upsample == 1:
            return k, v
        return self._interpolate(k), self._interpolate(v)

    def _interpolate(self, x: torch.Tensor) -> torch.Tensor:
        lead, (length, width) = x.shape[:-2], x.shape[-2:]
        flat = x.reshape(-1, length, width).transpose(1, 2)
        up = F.interpolate(flat, size=self.item_length, mode="linear", align_corners=True)
        return up.transpose(1, 2).reshape(*lead, self.item_length, width)

    def query_side(self, fq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, L, C) -> queries (P, L, d) scaled by 1/sqrt(d), values (P, L, dv)."""
        return self.q(fq) / math.sqrt(self.d), self.v(fq)

    @property
    def item_width(self) -> int:
        """Floats per member position that `item_side` produces (keys, then values)."""
        return self.d + self.dv

    def forward(self, qq: torch.Tensor, qv: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One score per pair: qq, qv (P, L, .), k, v (P, n, L, .). Symmetric in the members."""
        if self.mode == "rigid":
            return self._rigid(qq, qv, k, v)
        if self.mode == "template":
            return self._template_read(qq, qv, *self.template(k, v))
        logits = torch.einsum("pqd,pnld->pnql", qq, k) + self.rel[self.rel_idx] + self.rel_mask
        # One exp for the log-sum-exp and the softmax, its masked inputs (about -1e4) clamped at -80: torch's own
        # logsumexp and softmax spend an exp each (and the backward a third), the costliest calls, on inputs where
        # exp is slow. The masked weights are 2e-35 instead of 0, which no float32 sum next to the largest weight
        # (1) can show. Measured: serving 2.7-3.1x (benchmarks/bench_reader_forward.py), a training step 1.35x
        # (docs/results.md). Both results are invariant to the shift `top`, so no gradient need flow through it.
        top = logits.amax(-1, keepdim=True).detach()
        e = (logits - top).clamp_min(-80.0).exp()
        total = e.sum(-1, keepdim=True)
        lse, weights = (top + total.log()).squeeze(-1), e / total
        # lse (P, n, L): how well each member aligns at each query position
        if self.mode == "maxsim":
            return self.scale * lse.mean(1).sum(-1)
        aligned = torch.einsum("pnql,pnlv->pnqv", weights, v)
        m = aligned.mean(1)
        centred = aligned - m[:, None]
        spread = (centred * centred).mean(1)  # the variance over members (torch.var over this dim: 10x slower)
        diff = qv - m
        parts = [qv, m, diff, diff.pow(2), spread, lse.mean(1)[..., None]]
        if self.context:
            white = self.whiten(diff.transpose(1, 2)).transpose(1, 2)
            parts += [white, white.pow(2)]
        if self.nearest:
            parts.append((qv[:, None] - aligned).pow(2).amin(1))
        if self.shift:
            moved = torch.einsum("pnql,ql->pnq", weights, self.rel_pos)  # (P, n, L)
            mean_moved = moved.mean(1)
            parts += [
                mean_moved[..., None],
                mean_moved.pow(2)[..., None],
                (moved - mean_moved[:, None]).pow(2).mean(1)[..., None],
            ]
        feats = torch.cat(parts, -1)
        return self.mlp(feats).squeeze(-1).sum(-1)

    def template(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Members (P, n, Lu, .) aligned to each other -> the template's keys, values and spread (P, Lu, .)."""
        ref = k.mean(1)
        scale = self.align_scale / math.sqrt(self.d)
        align = self.member_alignment
        for _ in range(2):
            corr = align.scores(torch.einsum("pqd,pnld->pnql", ref, k)) * scale  # (P, n, S)
            moved = align.matrix(corr.softmax(-1))  # (P, n, Lu, Lu)
            ref = (moved @ k).mean(1)
        aligned = moved @ v
        m = aligned.mean(1)
        return ref, m, (aligned - m[:, None]).pow(2).mean(1)

    def _template_read(
        self, qq: torch.Tensor, qv: torch.Tensor, tk: torch.Tensor, tv: torch.Tensor, ts: torch.Tensor
    ) -> torch.Tensor:
        """The query read against the template (keys, values, spread) as `xattn` reads a member."""
        logits = torch.einsum("pqd,pld->pql", qq, tk) + self.rel[self.rel_idx] + self.rel_mask
        lse = logits.logsumexp(-1)
        w = logits.softmax(-1)
        m, spread = w @ tv, w @ ts
        diff = qv - m
        feats = torch.cat([qv, m, diff, diff.pow(2), spread, lse[..., None]], -1)
        return self.mlp(feats).squeeze(-1).sum(-1)

    def _rigid(self, qq: torch.Tensor, qv: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`forward` of the rigid mode (see `__init__`)."""
        align = self.query_alignment
        corr = align.scores(torch.einsum("pqd,pnld->pnql", qq, k)) + self.shift_prior  # (P, n, S)
        weights = corr.softmax(-1)
        lse = corr.logsumexp(-1)  # (P, n): how well each member aligns
        aligned = align.matrix(weights) @ v  # (P, n, L, dv)
        m = aligned.mean(1)
        centred = aligned - m[:, None]
        spread = (centred * centred).mean(1)
        diff = qv - m
        moved = weights @ align.shifts / 4.0  # (P, n): each member's expected shift onto the query, in 4 samples
        mean_moved = moved.mean(1)
        cluster = torch.stack(
            [lse.mean(1), mean_moved, mean_moved.pow(2), (moved - mean_moved[:, None]).pow(2).mean(1)], -1
        )  # (P, 4): the same for every query position
        parts = [qv, m, diff, diff.pow(2), spread, cluster[:, None].expand(-1, qv.shape[1], -1)]
        return self.mlp(torch.cat(parts, -1)).squeeze(-1).sum(-1)

    def flops_per_pair(self, n: int) -> int:
        """Multiply-adds x 2 of what runs per (query, cluster) pair reading n members, from the layer shapes (item
        side cached, query side once per query)."""
        L, Lu, d, dv, hidden = self.length, self.item_length, self.d, self.dv, self.hidden
        att = n * L * Lu * (2 * d + 4)  # logits (+ bias), logsumexp, softmax
        if self.mode == "maxsim":
            return att + n * L + L
        mlp = L * 2 * (self.width * hidden + hidden * hidden + hidden) + L * (4 * dv)
        if self.mode == "template":  # the query reads one template (its building is item side, once per cluster)
            return L * Lu * (2 * d + 4) + L * Lu * 4 * dv + mlp
        if self.mode == "rigid":
            shifts = self.shift_prior.numel()
            att = n * L * Lu * 2 * d + n * shifts * (2 * L + 6) + n * L * Lu * 3  # logits, correlation, Toeplitz
        att += n * L * Lu * 2 * dv  # aligned values
        att += n * L * dv * 3  # mean and spread over members
        if self.context:
            mlp += L * 2 * dv * dv * self.context + L * 2 * dv
        if self.nearest:
            mlp += n * L * dv * 3
        if self.shift:
            att += n * L * Lu * 2 + n * L * 4
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

    def query_flops(self) -> int:
        """Multiply-adds x 2 of the query side, once per query: its features (the first conv's, when read) and
        the query and value projections of every position."""
        L, c, n = self.reader.length, self.reader.q.in_features, self.trunk.input_dim
        features = 0
        for conv, positions, used in (
            (self.trunk.conv1, n, self.trunk.feature != "raw"),
            (self.trunk.conv2, n // 2, self.trunk.feature in ("c2", "b2")),
        ):
            if used:
                features += 2 * conv.out_channels * conv.in_channels * conv.kernel_size[0] * positions
        return features + 2 * L * c * (self.reader.d + self.reader.dv)

    def item_flops(self) -> int:
        """The same per item: what building the cached `item_table` costs once per item."""
        return self.query_flops()

    def item_table(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) items -> (N, L x (d + dv)): each item's keys and values, what serving caches once per item."""
        k, v = self.reader.item_side(self.trunk(x))
        return torch.cat([k, v], -1).flatten(1)

    def query_keys(self, q: torch.Tensor, items: torch.Tensor, retriever_score: torch.Tensor) -> torch.Tensor:
        """One query q (1, D) against G clusters of n members each, from their cached `item_table` rows
        (G, n, L x (d + dv)), with the retriever's scores (G,) -> keys (G,), as `scores` computes them."""
        qq, qv = self.reader.query_side(self.trunk(q))
        g, n = items.shape[:2]
        kv = items.reshape(g, n, self.reader.item_length, self.reader.item_width)
        k, v = kv[..., : self.reader.d], kv[..., self.reader.d :]
        s = self.reader(qq.expand(g, -1, -1), qv.expand(g, -1, -1), k, v)
        return s + self.reader.log_alpha.exp() * retriever_score if self.residual else s


def build_ranker(
    spec: ReaderSpec, sample: torch.Tensor | None = None, encoder: BiEncoder | None = None
) -> ReaderRanker:
    """A reader of this shape: its features copied from `encoder` and standardised on `sample` (training), or
    untrained placeholders that a stored state dict then fills (loading: every buffer is in the weights)."""
    encoder = encoder if encoder is not None else BiEncoder(BiEncoderSpec.from_dict(spec.encoder))
    sample = sample if sample is not None else torch.zeros(2, spec.input_dim)
    trunk = MemberFeatures(encoder, spec.feature, False, sample)
    with torch.no_grad():
        shape = trunk(sample[:1]).shape
    reader = ClusterReader(
        shape[2],
        shape[1],
        spec.mode,
        spec.d,
        spec.dv,
        spec.hidden,
        spec.max_shift,
        spec.context,
        spec.nearest,
        spec.shift,
        spec.upsample,
    )
    return ReaderRanker(trunk, reader)


def listwise_loss(keys: torch.Tensor) -> torch.Tensor:
    """Localized contrastive estimation: softmax cross-entropy over each group's keys (B, G), the query's own
    cluster first."""
    return F.cross_entropy(keys, torch.zeros(len(keys), dtype=torch.long, device=keys.device))
