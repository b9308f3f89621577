"""Pair models (cross-encoders): logits over relevance grades for a query q and an item x read together.

Architecture (chosen by measurement, docs/premise.md): a shallow shared trunk (one or two conv + ReLU,
optional max-pool) maps q and x to C feature channels; the first interaction is a per-channel correlation of
the two over shifts -S..S, per region of the query's positions (a translation shifts the peak instead of
breaking a position-by-position comparison, the failure of early fusion measured in issue 14), optionally
with the squared features per region ("energies"); a fixed affine normalisation of those numbers is the input
of `scorer`, an ordinary `Classifier`, so all 16 pruning methods apply to it unchanged.

The trunk does not depend on the query, so `item_features` may be computed once per item and cached; it is
shared by every pruned variant of one dense model (pruning only touches the scorer). Everything from the
correlation on is computed per pair.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.biencoder import BiEncoder, BiEncoderSpec
from models.flops import Flops, count_flops
from models.networks import Classifier
from models.spec import MAX_INPUT_DIM, NetworkSpec, spec_int

__all__ = [
    "SHARED_GEMM_ROWS",
    "PairSpec",
    "PairNetwork",
    "correlate",
    "cost_volume",
    "PairFlops",
    "pair_flops",
    "pair_query_flops",
    "FoldedQuery",
    "folded_pair_cost",
    "plain_pair_cost",
    "pair_cost",
    "default_pair_spec",
    "RetrieverQuery",
    "retriever_spec_from_dict",
]


SHARED_GEMM_ROWS = 16
"""Rows a product shared by several queries is padded to (`PairNetwork.score_prepared_many`). Measured with torch
2.13 (MKL, AVX512) on this machine: a row of an `addmm` with 1-15 rows (1-10 for 256 inputs or fewer) differs in
the last bits from the same row inside a larger call, in three kernel classes (1 row, 2-3, then up to 10-15);
from 16 rows on it is the same in every call of any size (tried up to 1,600 rows) and at any place in it, for
the scorer's shapes (1,408-2,432 x 256, 256 x 256, 256 x 3, 1,408 x 26). `models.inference.MIN_GEMM_ROWS` (4) is
enough only where the same chunk is computed alone and in a batch."""


@dataclass(frozen=True)
class PairSpec:
    """JSON description of a pair model; `scorer` is the prunable part (an MLP over the interaction)."""

    input_dim: int
    num_grades: int
    trunk_channels: int
    kernel_size: int
    max_shift: int
    pool: int
    scorer: NetworkSpec
    regions: int = 1
    """The query's positions are split into `regions` equal segments, each correlated separately (a cost
    volume pooled per region: where along the signal the two agree, not only at which shift)."""
    trunk_layers: int = 1
    """Conv + ReLU layers of the shared trunk (1 or 2; issue 14 allows at most a shallow item-side trunk)."""
    energies: bool = False
    """Also feed the mean squared feature per channel and region of q and of x (with the correlations they
    give the scorer squared distances under every shift)."""
    interaction: str = "channels"
    """`channels`: per channel (and region) correlation summed over positions, C x R x (2S+1) numbers.
    `positions`: a cost volume, per position and shift summed over channels, L x (2S+1) numbers."""
    retriever: BiEncoderSpec | None = None
    """A copy of the stage-0 bi-encoder (frozen): its score of the pair's cluster, -||e(q) - mean_c e||^2 (what
    FAISS ranks by), enters the logits through a learned affine (`PairNetwork.residual`), so the model starts
    from its retriever's ranking and the scorer learns what to change. The cluster's mean embedding is part of
    every member's item inputs (`cluster_context`)."""

    kind = "pair"

    def __post_init__(self) -> None:
        if self.input_dim <= 0 or self.num_grades < 2:
            raise ValueError("input_dim must be positive and num_grades at least 2")
        if self.trunk_channels <= 0 or self.kernel_size % 2 != 1 or self.max_shift < 0 or self.pool < 1:
            raise ValueError("trunk_channels > 0, odd kernel_size, max_shift >= 0 and pool >= 1 are required")
        if self.feature_length < 1 or self.max_shift >= self.feature_length:
            raise ValueError("max_shift must be smaller than the trunk's output length")
        if self.trunk_layers not in (1, 2):
            raise ValueError("trunk_layers must be 1 or 2")
        if self.interaction not in ("channels", "positions"):
            raise ValueError("interaction must be 'channels' or 'positions'")
        if self.interaction == "positions" and self.regions != 1:
            raise ValueError("regions apply to the 'channels' interaction only")
        if self.regions < 1 or self.feature_length % self.regions:
            raise ValueError(f"regions must divide the trunk's output length {self.feature_length}")
        if self.retriever is not None and self.retriever.input_dim != self.input_dim:
            raise ValueError("the retriever must read the pair model's input_dim")
        if self.scorer.input_dim != self.interaction_dim or self.scorer.num_classes != self.num_grades:
            raise ValueError(
                f"scorer must take interaction_dim={self.interaction_dim} inputs and give num_grades="
                f"{self.num_grades} outputs, got {self.scorer.input_dim} -> {self.scorer.num_classes}"
            )

    @property
    def feature_length(self) -> int:
        return self.input_dim // self.pool

    @property
    def shifts(self) -> int:
        return 2 * self.max_shift + 1

    @property
    def interaction_dim(self) -> int:
        if self.interaction == "positions":
            return self.feature_length * (self.shifts + (2 if self.energies else 0))
        return _interaction_dim(self.trunk_channels, self.max_shift, self.regions, self.energies)

    def with_scorer(self, scorer: NetworkSpec) -> PairSpec:
        return replace(self, scorer=scorer)

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.retriever is None else {"retriever": self.retriever.to_dict()}
        return extra | {
            "kind": "pair",
            "input_dim": self.input_dim,
            "num_grades": self.num_grades,
            "trunk_channels": self.trunk_channels,
            "kernel_size": self.kernel_size,
            "max_shift": self.max_shift,
            "pool": self.pool,
            "regions": self.regions,
            "trunk_layers": self.trunk_layers,
            "energies": self.energies,
            "interaction": self.interaction,
            "scorer": self.scorer.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairSpec:
        required = {"kind", "input_dim", "num_grades", "trunk_channels", "kernel_size", "max_shift", "pool", "scorer"}
        known = required | {"regions", "energies", "trunk_layers", "interaction", "retriever"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown pair spec keys: {sorted(unknown)}")
        if d.get("kind") != "pair":
            raise ValueError(f"a pair spec has kind 'pair', got {d.get('kind')!r}")
        missing = required - set(d)
        if missing:
            raise ValueError(f"pair spec lacks keys: {sorted(missing)}")
        if not isinstance(d["scorer"], dict):
            raise ValueError("pair spec 'scorer' must be a network spec object")
        return cls(  # every number range-checked first: untrusted JSON (an upload) may hold Infinity or 1e300
            input_dim=spec_int(d, "input_dim", 1, MAX_INPUT_DIM),
            num_grades=spec_int(d, "num_grades", 2, 64),
            trunk_channels=spec_int(d, "trunk_channels", 1, 4096),
            kernel_size=spec_int(d, "kernel_size", 1, 255),
            max_shift=spec_int(d, "max_shift", 0, 4096),
            pool=spec_int(d, "pool", 1, 4096),
            scorer=NetworkSpec.from_dict(d["scorer"]),
            regions=spec_int(d, "regions", 1, 4096, default=1),
            trunk_layers=spec_int(d, "trunk_layers", 1, 2, default=1),
            energies=_flag(d.get("energies", False), "energies"),
            interaction=_choice(d.get("interaction", "channels"), "interaction", ("channels", "positions")),
            retriever=None if d.get("retriever") is None else retriever_spec_from_dict(d["retriever"]),
        )


def retriever_spec_from_dict(d: Any) -> BiEncoderSpec:
    """A bi-encoder spec from untrusted JSON (an uploaded pair model's retriever): every number range-checked."""
    if not isinstance(d, dict):
        raise ValueError("retriever: must be a bi-encoder spec object")
    unknown = set(d) - {"kind", "input_dim", "channels", "kernel_size", "hidden", "embed_dim"}
    if unknown:
        raise ValueError(f"retriever: unknown keys {sorted(unknown)}")
    if d.get("kind", "biencoder") != "biencoder":
        raise ValueError("retriever: kind must be 'biencoder'")
    channels = d.get("channels")
    if not isinstance(channels, list) or not 1 <= len(channels) <= 8:
        raise ValueError("retriever.channels: a list of 1 to 8 integers")
    try:
        return BiEncoderSpec(
            input_dim=spec_int(d, "input_dim", 2, MAX_INPUT_DIM),
            channels=tuple(spec_int({"c": c}, "c", 1, 4096) for c in channels),
            kernel_size=spec_int(d, "kernel_size", 1, 255),
            hidden=spec_int(d, "hidden", 1, 65536),
            embed_dim=spec_int(d, "embed_dim", 1, 4096),
        )
    except ValueError as e:
        raise ValueError(f"retriever: {e}") from None


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: must be true or false, got {type(value).__name__}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{key}: one of {', '.join(choices)}")
    return str(value)


def _interaction_dim(channels: int, max_shift: int, regions: int, energies: bool) -> int:
    return channels * regions * (2 * max_shift + 1 + (2 if energies else 0))


def default_pair_spec(
    input_dim: int = 40,
    num_grades: int = 3,
    *,
    trunk_channels: int = 32,
    kernel_size: int = 5,
    max_shift: int = 8,
    pool: int = 1,
    hidden: tuple[int, ...] = (256, 256),
    regions: int = 4,
    energies: bool = True,
    trunk_layers: int = 1,
    interaction: str = "channels",
) -> PairSpec:
    """The default dense pair model (chosen by measurement, docs/premise.md): 32 trunk channels, shifts
    -8..8, 4 regions, energies, an MLP scorer 2432 -> 256 -> 256 -> grades. The scorer is 97% of the
    per-pair FLOPs, so pruning it pays."""
    if interaction == "positions":
        dim = (input_dim // pool) * (2 * max_shift + 1 + (2 if energies else 0))
    else:
        dim = _interaction_dim(trunk_channels, max_shift, regions, energies)
    scorer = NetworkSpec("mlp", dim, num_grades, hidden=hidden)
    return PairSpec(
        input_dim,
        num_grades,
        trunk_channels,
        kernel_size,
        max_shift,
        pool,
        scorer,
        regions,
        trunk_layers,
        energies,
        interaction,
    )


class PairNetwork(nn.Module):
    """`forward_with_hidden(q, x)`: q is (P, D) or (1, D) (broadcast over the P items of x)."""

    scorer_kind = "pair"

    def __init__(self, spec: PairSpec, scorer: Classifier | None = None) -> None:
        super().__init__()
        self.spec = spec
        c, k = spec.trunk_channels, spec.kernel_size
        layers: list[nn.Module] = [nn.Conv1d(1, c, k, padding=k // 2), nn.ReLU()]
        if spec.trunk_layers == 2:
            layers += [nn.Conv1d(c, c, k, padding=k // 2), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        # a per-feature affine of the correlations (BatchNorm: batch statistics in training, fixed in eval)
        self.norm = nn.BatchNorm1d(spec.interaction_dim)
        self.scorer = scorer if scorer is not None else Classifier(spec.scorer)
        if self.scorer.spec != spec.scorer:
            raise ValueError("the scorer's spec differs from spec.scorer")
        self.retriever: BiEncoder | None = None
        self.residual: nn.Linear | None = None
        self.temperature = 1.0
        """Divides the logits of a model with a retriever (its residual's path): the calibrated temperature the
        registry entry keeps (`posterior_calibration`), set by the snapshot that serves it; not a weight."""
        if spec.retriever is not None:
            self.retriever = BiEncoder(spec.retriever).eval().requires_grad_(False)
            # logits += w * s + b with s the retriever's score: the top grade's logit rises with s, at the scale
            # that fits the retriever's look-alikes best (measured: a softmax over a query's own cluster and 7 of
            # its FAISS top 32 has the least cross-entropy near 30 x the centroid cosine, i.e. 15 x s), zero at a
            # typical own cluster's distance (0.3)
            self.residual = nn.Linear(1, spec.num_grades)
            with torch.no_grad():
                self.residual.weight.zero_()
                self.residual.bias.zero_()
                self.residual.weight[-1, 0] = 15.0
                self.residual.bias[-1] = 4.5
            if scorer is None:  # a fresh scorer adds nothing yet: the model ranks exactly as its retriever
                with torch.no_grad():
                    self.scorer.head.weight.zero_()
                    self.scorer.head.bias.zero_()

    # -- the retriever's score (`spec.retriever`) ------------------------------------------------------------
    def train(self, mode: bool = True) -> PairNetwork:
        super().train(mode)
        if self.retriever is not None:
            self.retriever.eval()  # frozen: the copy of stage 0 must keep scoring as FAISS does
        return self

    def retriever_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E): the retriever's unit-norm embedding (the vectors FAISS indexes)."""
        assert self.retriever is not None
        return self.retriever.embed(x)

    def cluster_context(self, items: torch.Tensor, offsets: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, E): for every item, the mean retriever embedding of its cluster (items grouped by cluster,
        `offsets` as in `Space`): FAISS's centroid, which `item_inputs` stores beside each member. Zero columns
        for a model without a retriever."""
        if self.retriever is None:
            return items.new_zeros(len(items), 0)
        offsets_t = torch.as_tensor(np.asarray(offsets), dtype=torch.long)
        sizes = offsets_t[1:] - offsets_t[:-1]
        with torch.no_grad():
            emb = torch.cat([self.retriever_embedding(items[i : i + 8192]) for i in range(0, len(items), 8192)])
            cluster = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
            sums = torch.zeros(len(sizes), emb.shape[1], dtype=torch.float64).index_add_(0, cluster, emb.double())
            means = (sums / sizes.clamp_min(1)[:, None]).float()
        return means[cluster]

    def retriever_score(self, eq: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(P, 1): -||e(q) - centroid||^2, the negative squared L2 distance FAISS ranks clusters by."""
        return -(eq - context).pow(2).sum(1, keepdim=True)

    def _with_residual(
        self, out: tuple[torch.Tensor, torch.Tensor], eq: torch.Tensor | None, context: torch.Tensor | None
    ):
        if self.residual is None:
            return out
        assert eq is not None and context is not None
        logits, hidden = out
        logits = logits + self.residual(self.retriever_score(eq, context))
        return (logits if self.temperature == 1.0 else logits / self.temperature), hidden

    def _raw_context(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        if self.retriever is None:
            return None
        return self.retriever_embedding(x) if context is None else context

    # -- item side (query independent; cacheable) ----------------------------------------------------------
    def item_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C, L): one conv + ReLU (+ max-pool). Memory per cached item: C x L floats."""
        f = self.trunk(x.unsqueeze(1))
        return F.max_pool1d(f, self.spec.pool) if self.spec.pool > 1 else f

    def query_features(self, q: torch.Tensor) -> torch.Tensor:
        """The query goes through the same trunk (once per query)."""
        return self.item_features(q)

    # -- per pair ------------------------------------------------------------------------------------------
    def interact(self, fq: torch.Tensor, fx: torch.Tensor, ex: torch.Tensor | None = None) -> torch.Tensor:
        """Per-channel correlation over shifts: z[p, c, s] = mean_t fq[p, c, t] * fx[p, c, t + s - S]
        (zero outside), then the fixed affine normalisation. fq: (P or 1, C, L); fx: (P, C, L); `ex` the
        cached `item_energies(fx)` ('channels' interaction; computed here when not given)."""
        spec = self.spec
        if spec.interaction == "positions":
            z = cost_volume(fq, fx, spec.max_shift).flatten(1)
            if spec.energies:
                c = fq.shape[1]
                z = torch.cat([z, (fq.pow(2).sum(1) / c).expand(len(z), -1), fx.pow(2).sum(1) / c], dim=1)
            return self.norm(z)
        z = correlate(fq, fx, spec.max_shift, spec.regions).flatten(1)
        if spec.energies:
            eq = fq.pow(2).unflatten(2, (spec.regions, -1)).mean(-1).flatten(1).expand(len(z), -1)
            z = torch.cat([z, eq, self.item_energies(fx) if ex is None else ex], dim=1)
        return self.norm(z)

    def interaction(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The scorer's input z for raw query and item vectors."""
        return self.interact(self.query_features(q), self.item_features(x))

    def forward_features(
        self, fq: torch.Tensor, fx: torch.Tensor, ex: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, hidden) of the scorer from trunk features (cached item features and energies, a query's
        features); without the retriever's residual (`score_prepared` adds it)."""
        return self.scorer.forward_with_hidden(self.interact(fq, fx, ex))

    def forward_with_hidden(
        self, q: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw queries (P or 1, D) and items (P, D). `context` (P, E): each item's cluster centroid in the
        retriever's embedding (`cluster_context`); None: the item's own embedding (a cluster of one)."""
        out = self.scorer.forward_with_hidden(self.interaction(q, x))
        if self.retriever is None:
            return out
        eq = self.retriever_embedding(q)
        return self._with_residual(out, eq.expand(len(x), -1) if len(eq) == 1 else eq, self._raw_context(x, context))

    def forward(self, q: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_hidden(q, x, context)[0]

    # -- the scorer interface (`models.scorer`) -------------------------------------------------------------
    # Served from *item inputs*: what the model reads per item that does not depend on the query (`item_inputs`:
    # the trunk features, flattened, and for the 'channels' interaction the item energies). They are the same
    # for every variant that shares this trunk (`item_inputs_key`), so a snapshot computes them once per item
    # and caches them; FLOPs per pair (`flops`) then exclude the trunk, whose one-off cost is
    # `item_input_flops` per item.
    def item_inputs(self, items: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) raw items -> (N, item_input_width) floats: trunk features (C x L), then the item energies
        (C x R) for a 'channels' model with energies, then (with a retriever) the item's cluster centroid in the
        retriever's embedding: `context` (N, E) from `cluster_context`, or the item's own embedding."""
        fx = self.item_features(items)
        parts = [fx.flatten(1)]
        if self.spec.interaction == "channels" and self.spec.energies:
            parts.append(self.item_energies(fx))
        if self.retriever is not None:
            parts.append(self.retriever_embedding(items) if context is None else context.to(fx.dtype))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    @property
    def _context_width(self) -> int:
        return 0 if self.spec.retriever is None else self.spec.retriever.embed_dim

    @property
    def item_input_width(self) -> int:
        """Floats cached per item."""
        s = self.spec
        extra = s.trunk_channels * s.regions if s.interaction == "channels" and s.energies else 0
        return s.trunk_channels * s.feature_length + extra + self._context_width

    def item_inputs_key(self) -> str:
        """Identity of `item_inputs` as a function: the front end's spec and the trunk's weights. Variants
        pruned from one dense model share it (pruning touches only the scorer), so one cache serves them all."""
        s = self.spec
        h = hashlib.sha256(
            repr((s.input_dim, s.trunk_channels, s.kernel_size, s.pool, s.trunk_layers, s.regions, s.energies)).encode()
        )
        h.update(s.interaction.encode())
        tensors = list(self.trunk.state_dict().values())
        if self.retriever is not None:  # the cached centroids are the retriever's
            h.update(repr(s.retriever).encode())
            tensors += list(self.retriever.state_dict().values())
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return "pair-trunk:" + h.hexdigest()[:24]

    def item_input_flops(self) -> Flops:
        """FLOPs of `item_inputs` per item (paid once per item when cached): the trunk and the energies."""
        s = self.spec
        cost = pair_cost(self).per_item
        if s.interaction == "channels" and s.energies:
            cost = cost + Flops(2 * s.trunk_channels * s.feature_length, 2 * s.trunk_channels * s.feature_length)
        if self.retriever is not None:  # its embedding of the item, and the item's share of the centroid
            e = self._context_width
            cost = cost + _retriever_flops(self) + Flops(e, e)
        return cost

    def _split_inputs(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.spec
        cl = s.trunk_channels * s.feature_length
        if inputs.ndim != 2 or inputs.shape[1] != self.item_input_width:
            raise ValueError(f"item inputs must be (N, {self.item_input_width}), got {tuple(inputs.shape)}")
        fx = inputs[:, :cl].reshape(len(inputs), s.trunk_channels, s.feature_length)
        end = inputs.shape[1] - self._context_width
        return fx, (inputs[:, cl:end] if end > cl else None)

    def folds(self, num_items: int | None) -> bool:
        """Whether serving one query against `num_items` items folds the query (`fold_query`): the cheaper
        path in FLOPs (dense kernels), so the choice and `flops` agree. None: many items."""
        return self._choose(num_items, self._path_costs())[0]

    def _choose(
        self, num_items: int | None, costs: tuple[tuple[Flops, Flops], tuple[Flops, Flops]]
    ) -> tuple[bool, tuple[Flops, Flops]]:
        (f_pair, f_query), plain = costs
        if self.spec.interaction != "channels":
            return False, plain
        if num_items is None:
            return True, (f_pair, f_query)
        p_pair, p_query = plain
        fold = f_query.dense_kernel + num_items * f_pair.dense_kernel <= p_query.dense_kernel + (
            num_items * p_pair.dense_kernel
        )
        return fold, ((f_pair, f_query) if fold else plain)

    def _path_costs(self) -> tuple[tuple[Flops, Flops], tuple[Flops, Flops]]:
        """(folded, plain) x (per pair, per query) FLOPs, counted once per set of weights (masks change the
        nonzero counts)."""
        key = self._weights_key(everything=True)
        cached = self.__dict__.get("_costs")
        if cached is None or cached[0] != key:
            plain = plain_pair_cost(self)
            folded = folded_pair_cost(self) if self.spec.interaction == "channels" else plain
            cached = (key, (folded, plain))
            self.__dict__["_costs"] = cached
        return cached[1]

    def flops(self, num_items: int, *, prepared_for: int | None = None) -> Flops:
        """FLOPs of one query against `num_items` cached item inputs, as `prepare` + `score_prepared` serve
        it (the path `folds` picks): per query the query's trunk (and the fold), per pair the rest.
        `prepared_for`: the query was prepared before for that many items (its path) and is reused: only the
        pairs count."""
        if prepared_for is None:
            pair, query = self._choose(num_items, self._path_costs())[1]
            return query + pair * num_items
        pair, _ = self._choose(prepared_for, self._path_costs())[1]
        return pair * num_items

    def prepare(
        self, query: torch.Tensor | None, num_items: int | None = None
    ) -> FoldedQuery | torch.Tensor | RetrieverQuery:
        """Once per query: its trunk features, folded into the scorer's first layer (`fold_query`) when that
        is the cheaper path for `num_items` items (`folds`); otherwise kept as they are (the plain path). With a
        retriever, wrapped with the query's retriever embedding (`RetrieverQuery`)."""
        if query is None:
            raise ValueError("a pair model needs the query")
        fq = self.query_features(query)
        prepared = self.fold_query(fq) if self.folds(num_items) else fq
        if self.retriever is None:
            return prepared
        return RetrieverQuery(prepared, self.retriever_embedding(query))

    def score_prepared(
        self, prepared: FoldedQuery | torch.Tensor | RetrieverQuery, inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, hidden) of a prepared query against item inputs (P, item_input_width), see `item_inputs`."""
        eq = None
        if isinstance(prepared, RetrieverQuery):
            prepared, eq = prepared.prepared, prepared.embedding
        elif self.retriever is not None:
            raise ValueError("this pair model has a retriever: prepare the query with its own `prepare`")
        if isinstance(prepared, FoldedQuery):
            if inputs.shape[1] != prepared.stacked.shape[0] + self._context_width:
                width = prepared.stacked.shape[0] + self._context_width
                raise ValueError(f"item inputs must be (N, {width}), got {tuple(inputs.shape)}")
            feats = inputs[:, : prepared.stacked.shape[0]] if self._context_width else inputs
            h = self.scorer.body[1:](torch.addmm(prepared.bias, feats, prepared.stacked))
            out = self.scorer.head(h), h
        else:
            fx, ex = self._split_inputs(inputs)
            out = self.forward_features(prepared, fx, ex)
        if eq is None:
            return out
        return self._with_residual(out, eq.expand(len(inputs), -1), inputs[:, inputs.shape[1] - self._context_width :])

    def score_prepared_many(
        self, prepared: list[FoldedQuery | torch.Tensor | RetrieverQuery], inputs: list[torch.Tensor], step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`score_prepared` for several queries, each against its own item inputs, outputs concatenated in order:
        what depends on the query (its folded first layer, or its correlation) runs per query, the rest of the
        scorer once over every query's rows, in chunks of at most `step` rows, and so does the retriever's
        residual (the distance of each row's query embedding to its item's cluster centroid, its affine and the
        temperature). A query's own products run on its own chunks (the same alone or in a batch, padded to
        `models.inference.MIN_GEMM_ROWS`); the shared ones on at least `SHARED_GEMM_ROWS` rows (padded), from
        which on a row's result depends neither on the call's other rows nor on its place in the call, so
        each query's rows equal what it gets alone."""
        from models.inference import balanced_chunks, rows_at_least

        context = self._context_width
        fronts: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        order: list[tuple[bool, int]] = []  # per query: its path and its number of rows
        embeddings: list[torch.Tensor] = []  # with a retriever: per query, its embedding once per row
        centroids: list[torch.Tensor] = []  # and its rows' cluster centroids (the last columns of the inputs)
        for p, x in zip(prepared, inputs, strict=True):
            eq = None
            if isinstance(p, RetrieverQuery):
                p, eq = p.prepared, p.embedding
            elif self.retriever is not None:
                raise ValueError("this pair model has a retriever: prepare the query with its own `prepare`")
            folded = isinstance(p, FoldedQuery)
            if folded and x.shape[1] != p.stacked.shape[0] + context:
                width = p.stacked.shape[0] + context
                raise ValueError(f"item inputs must be (N, {width}), got {tuple(x.shape)}")
            feats = x[:, : x.shape[1] - context] if folded and context else x
            for a, b in balanced_chunks(len(x), step) if len(x) else []:
                if folded:
                    front = torch.addmm(p.bias, rows_at_least(feats[a:b]), p.stacked)
                else:
                    fx, ex = self._split_inputs(rows_at_least(x[a:b]))
                    front = self.interact(p, fx, ex)
                fronts[folded].append(front[: b - a])
            order.append((folded, len(x)))
            if eq is not None:
                embeddings.append(eq.expand(len(x), -1))
                centroids.append(x[:, x.shape[1] - context :])
        outs: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        for folded in {f for f, _ in order}:
            parts = fronts[folded]
            y = torch.cat(parts) if parts else torch.zeros(0, self._front_width(folded))
            logits, hidden = [], []
            for a, b in balanced_chunks(len(y), step) if len(y) else [(0, 0)]:
                rows = rows_at_least(y[a:b], SHARED_GEMM_ROWS)
                h = self.scorer.body[1:](rows) if folded else self.scorer.body(rows)
                logits.append(self.scorer.head(h)[: b - a])
                hidden.append(h[: b - a])
            outs[folded] = torch.cat(logits), torch.cat(hidden)
        if not outs:
            raise ValueError("nothing to score")
        if len(outs) == 1:
            out_logits, out_hidden = next(iter(outs.values()))
        else:  # both paths in one call: back to the queries' order
            logit_parts, hidden_parts, taken = [], [], {True: 0, False: 0}
            for folded, n in order:
                a = taken[folded]
                logit_parts.append(outs[folded][0][a : a + n])
                hidden_parts.append(outs[folded][1][a : a + n])
                taken[folded] = a + n
            out_logits, out_hidden = torch.cat(logit_parts), torch.cat(hidden_parts)
        if self.residual is None:
            return out_logits, out_hidden
        # the retriever's residual over every row of every query at once (row-wise, its affine padded)
        score = self.retriever_score(torch.cat(embeddings), torch.cat(centroids))
        shifts = [
            self.residual(rows_at_least(score[a:b], SHARED_GEMM_ROWS))[: b - a]
            for a, b in balanced_chunks(len(score), step)
        ]
        out_logits = out_logits + (torch.cat(shifts) if shifts else out_logits[:0])
        return (out_logits if self.temperature == 1.0 else out_logits / self.temperature), out_hidden

    def _front_width(self, folded: bool) -> int:
        """Width of the per-query part's output: the scorer's first hidden layer (folded) or its input."""
        return self.scorer.body[0].weight.shape[0] if folded else self.spec.interaction_dim

    def score(self, query: torch.Tensor | None, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One query (1, D) read with every raw item (P, D): `prepare`, `item_inputs`, `score_prepared`."""
        return self.score_prepared(self.prepare(query, len(items)), self.item_inputs(items))

    def activation_width(self) -> int:
        """Floats per pair of the widest tensor of a served forward pass (sizes chunks, `models.inference`)."""
        s = self.spec
        return max(s.trunk_channels * s.input_dim, self.item_input_width, *s.scorer.hidden)

    # -- serving one query against many items: fold the query into the scorer's first layer ---------------
    def _weights_key(self, everything: bool = False) -> tuple[int, ...]:
        """Changes whenever a weight the fold reads (`everything`: any weight) changes: in-place updates bump
        a tensor's version, a replaced tensor has a new id (for `everything`, the tensors are listed once per
        model: a weight changed in place is seen, a module replaced after the first query is not)."""
        if everything:  # the list is walked once per model (a forward pass is not the place for module walks)
            tensors = self.__dict__.get("_all_tensors")
            if tensors is None:
                tensors = [*self.parameters(), *self.buffers()]
                self.__dict__["_all_tensors"] = tensors
        else:
            first = self.scorer.body[0]
            tensors = [first.weight, first.bias, self.norm.weight, self.norm.bias]
            tensors += [self.norm.running_mean, self.norm.running_var]
        return tuple(v for t in tensors for v in (id(t), t._version))

    @torch.no_grad()
    def _fold_plan(self) -> _FoldPlan:
        """What the fold needs that does not depend on the query, computed once per set of weights: the
        normalisation folded into the first layer, its correlation block per channel, the Toeplitz
        scatter positions."""
        key = self._weights_key()
        plan = self.__dict__.get("_plan")
        if plan is not None and plan.key == key:
            return plan
        spec = self.spec
        channels, length = spec.trunk_channels, spec.feature_length
        s, regions, width = spec.max_shift, spec.regions, spec.shifts
        seg = length // regions
        first = self.scorer.body[0]
        a = self.norm.weight / torch.sqrt(self.norm.running_var + self.norm.eps)
        b = self.norm.bias - self.norm.running_mean * a
        w = first.weight * a[None, :]  # (h1, D): normalisation folded into the first layer
        bias = first.bias + first.weight @ b
        n_corr = channels * regions * width
        # op_t[c, u, r * W + j] = fq[c, t] / seg with t = u - j + S in region r: matrix[c] = op_t[c] @ w_corr_t[c]
        u = torch.arange(length)[:, None]
        j = torch.arange(width)[None, :]
        t = u - j + s
        valid = (t >= 0) & (t < length)
        positions = (u * (regions * width) + (t.clamp(0, length - 1) // seg) * width + j)[valid]
        w_corr_t = w[:, :n_corr].reshape(-1, channels, regions * width).permute(1, 2, 0).contiguous()
        w_eq = energy_t = None
        if spec.energies:
            w_eq = w[:, n_corr : n_corr + channels * regions].contiguous()
            energy_t = w[:, n_corr + channels * regions :].T.contiguous()
        plan = _FoldPlan(key, w_corr_t, positions, t[valid], seg, bias.contiguous(), w_eq, energy_t)
        self.__dict__["_plan"] = plan
        return plan

    @torch.no_grad()
    def fold_query(self, fq: torch.Tensor) -> FoldedQuery:
        """For one query (features (1, C, L)), the correlation, the normalisation (eval) and the scorer's
        first Linear are all linear in the item's features, so they compose into one (C*L, h1) matrix: per
        pair, the first interaction becomes one matrix-vector product with the cached item inputs (features
        and energies). Same outputs as `forward_features` in eval mode; 'channels' interaction only."""
        spec = self.spec
        if spec.interaction != "channels":
            raise ValueError("folding is implemented for the 'channels' interaction")
        plan = self._fold_plan()
        channels, length = fq.shape[1:]
        width = spec.regions * spec.shifts
        h1 = len(plan.bias)
        op_t = fq.new_zeros(channels, length * width)
        op_t[:, plan.positions] = fq[0][:, plan.sources] / plan.seg
        extra = channels * spec.regions if spec.energies else 0
        stacked = fq.new_empty(channels * length + extra, h1)
        out = stacked[: channels * length].view(channels, length, h1)
        torch.bmm(op_t.view(channels, length, width), plan.w_corr_t, out=out)
        return self._folded(plan, fq, stacked)

    def _folded(self, plan: _FoldPlan, fq: torch.Tensor, stacked: torch.Tensor) -> FoldedQuery:
        """A folded query whose correlation rows are already in `stacked`: its energy rows and its bias (the
        query's own energies through the first layer)."""
        spec = self.spec
        rows = fq.shape[1] * fq.shape[2]
        bias, energy = plan.bias, None
        if spec.energies:
            assert plan.w_eq is not None and plan.energy_t is not None
            eq = fq[0].pow(2).unflatten(1, (spec.regions, -1)).mean(-1).reshape(-1)
            bias = torch.addmv(bias, plan.w_eq, eq)
            stacked[rows:] = plan.energy_t
            energy = stacked[rows:]
        return FoldedQuery(stacked[:rows], bias, energy, stacked)

    @torch.no_grad()
    def fold_queries(self, fqs: list[torch.Tensor]) -> list[FoldedQuery]:
        """`fold_query` for several queries, one after the other: each query's product writes straight into its
        own folded matrix. Stacking every query's rows into one product per channel (tried before) made the product
        itself no faster and added a copy of each query's result out of the shared one: `prepare_many` for 8 queries
        of `pair-dense` took 2.1-2.4x the CPU time of this (`benchmarks/bench_score_many.py`, both checkouts,
        docs/performance.md 0b). The same results either way, bit for bit."""
        return [self.fold_query(fq) for fq in fqs]

    def prepare_many(
        self, queries: list[torch.Tensor | None], num_items: list[int]
    ) -> list[FoldedQuery | torch.Tensor | RetrieverQuery]:
        """`prepare` for several queries: the ones that fold are folded together (`fold_queries`)."""
        if any(q is None for q in queries):
            raise ValueError("a pair model needs the query")
        fqs = [self.query_features(q) for q in queries]  # type: ignore[arg-type]
        fold = [self.folds(n) for n in num_items]
        folded = iter(self.fold_queries([fq for fq, f in zip(fqs, fold, strict=True) if f]) if any(fold) else [])
        prepared = [next(folded) if f else fq for fq, f in zip(fqs, fold, strict=True)]
        if self.retriever is None:
            return prepared
        return [RetrieverQuery(p, self.retriever_embedding(q)) for p, q in zip(prepared, queries, strict=True)]

    def item_energies(self, fx: torch.Tensor) -> torch.Tensor:
        """(P, C*R) mean squared feature per channel and region: query independent, cacheable with fx."""
        return fx.pow(2).unflatten(2, (self.spec.regions, -1)).mean(-1).flatten(1)

    def forward_folded(
        self, folded: FoldedQuery, fx: torch.Tensor, energies: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, hidden) of a folded query against item features fx (P, C, L); `energies` are
        the cached `item_energies(fx)` (computed here when not given)."""
        y = torch.addmm(folded.bias, fx.flatten(1), folded.matrix)
        if folded.energy is not None:
            ex = self.item_energies(fx) if energies is None else energies
            y = torch.addmm(y, ex, folded.energy)
        h = self.scorer.body[1:](y)
        return self.scorer.head(h), h

    def with_scorer(self, scorer: Classifier) -> PairNetwork:
        """The same front end (trunk, normalisation, retriever and its residual; copied) with another scorer,
        e.g. a pruned one."""
        out = PairNetwork(self.spec.with_scorer(scorer.spec), scorer)
        out.trunk = copy.deepcopy(self.trunk)
        out.norm = copy.deepcopy(self.norm)
        if self.retriever is not None:
            out.retriever = copy.deepcopy(self.retriever)
            out.residual = copy.deepcopy(self.residual)
        return out.train(self.training)


def correlate(fq: torch.Tensor, fx: torch.Tensor, max_shift: int, regions: int = 1) -> torch.Tensor:
    """(P, C, R, 2S+1) correlations over shifts, one per region r of the query's positions, each divided by
    the region's length: z[p, c, r, j] = mean_{t in r} fq[p, c, t] * fx[p, c, t + j - S] (zero outside).
    With R = 1 the region axis is dropped: (P, C, 2S+1). One query for all items (serving): one batched GEMM
    per channel against the query's block-Toeplitz matrix; one query per item (training): a loop over shifts."""
    s, length = max_shift, fx.shape[-1]
    seg, width = length // regions, 2 * s + 1
    padded = F.pad(fx, (s, s))
    if fq.shape[0] == 1 and fx.shape[0] != 1:
        # toeplitz[c, t + j, r * width + j] = fq[c, t] for t in region r: (C, L + 2S, R * (2S + 1))
        q = fq[0]
        channels = q.shape[0]
        toeplitz = q.new_zeros(channels, length + 2 * s, regions * width)
        t = torch.arange(length)
        j = torch.arange(width)
        rows = (t[:, None] + j[None, :]).reshape(-1)
        cols = ((t // seg)[:, None] * width + j[None, :]).reshape(-1)
        toeplitz[:, rows, cols] = q[:, t].repeat_interleave(width, dim=1)
        out = torch.bmm(padded.transpose(0, 1), toeplitz).transpose(0, 1) / seg  # (P, C, R * width)
    else:
        windows = [(fq * padded[..., j : j + length]).unflatten(-1, (regions, seg)).sum(-1) for j in range(width)]
        out = torch.stack(windows, dim=-1) / seg  # (P, C, R, width)
    return (
        out.reshape(out.shape[0], out.shape[1], regions, width)
        if regions > 1
        else out.reshape(out.shape[0], out.shape[1], width)
    )


def cost_volume(fq: torch.Tensor, fx: torch.Tensor, max_shift: int) -> torch.Tensor:
    """(P, L, 2S+1): v[p, t, j] = mean_c fq[p, c, t] * fx[p, c, t + j - S] (zero outside): where along the
    signal and at which shift the two agree. One query for all items: one GEMM of every item position with
    every query position, then the band |shift| <= S is gathered; one query per item: a loop over shifts."""
    s, (channels, length) = max_shift, fx.shape[1:]
    width = 2 * s + 1
    padded = F.pad(fx, (s, s))
    if fq.shape[0] == 1 and fx.shape[0] != 1:
        grid = torch.matmul(padded.transpose(1, 2), fq[0])  # (P, L + 2S, L): [p, u, t] = <fx[:, u], fq[:, t]>
        t = torch.arange(length)
        idx = ((t[:, None] + torch.arange(width)[None, :]) * length + t[:, None]).reshape(-1)
        return grid.reshape(len(fx), -1)[:, idx].reshape(len(fx), length, width) / channels
    return torch.stack([(fq * padded[..., j : j + length]).sum(1) for j in range(width)], dim=-1) / channels


@dataclass(frozen=True)
class FoldedQuery:
    """A query folded into a pair model's first scorer layer (`PairNetwork.fold_query`)."""

    matrix: torch.Tensor  # (C*L, h1)
    bias: torch.Tensor  # (h1,)
    energy: torch.Tensor | None  # (C*R, h1) when the spec has energies
    stacked: torch.Tensor  # (C*L [+ C*R], h1): matrix and energy in one, against cached item inputs


@dataclass(frozen=True)
class RetrieverQuery:
    """A prepared query of a pair model with a retriever: the trunk's path (folded or plain) and the query's
    retriever embedding (1, E), which meets each item's cluster centroid in the residual."""

    prepared: FoldedQuery | torch.Tensor
    embedding: torch.Tensor


@dataclass(frozen=True)
class _FoldPlan:
    """The query-independent part of a fold (`PairNetwork._fold_plan`)."""

    key: tuple[int, ...]
    w_corr_t: torch.Tensor  # (C, R*W, h1)
    positions: torch.Tensor  # where each query feature lands in a channel's (L x R*W) Toeplitz operator
    sources: torch.Tensor  # which query position it is
    seg: int
    bias: torch.Tensor  # (h1,)
    w_eq: torch.Tensor | None  # (h1, C*R): the query energies' block
    energy_t: torch.Tensor | None  # (C*R, h1): the item energies' block


def _trunk_flops(model: PairNetwork) -> Flops:
    s = model.spec
    convs = [m for m in model.trunk if isinstance(m, nn.Conv1d)]
    return Flops(
        sum(2 * m.weight.numel() * s.input_dim for m in convs),
        sum(2 * int(torch.count_nonzero(m.weight)) * s.input_dim for m in convs),
    )


def _retriever_flops(model: PairNetwork) -> Flops:
    """One pass of the pair model's retriever copy (the query's or an item's embedding); zero without one."""
    if model.retriever is None:
        return Flops(0, 0)
    return count_flops(model.retriever, model.spec.input_dim)


def _residual_flops(model: PairNetwork) -> int:
    """Per pair, the retriever's score and its affine into the logits: the difference and its square summed
    (3 E), times the residual's weights plus its bias, added to the logits (3 G)."""
    if model.retriever is None:
        return 0
    return 3 * model._context_width + 3 * model.spec.num_grades


def folded_pair_cost(model: PairNetwork) -> tuple[Flops, Flops]:
    """(per pair, per query) FLOPs of the folded path against cached item inputs: per pair the product of
    the item inputs (C*L features and C*R energies) with the folded (h1 columns) matrix and the scorer after
    its first layer; per query the query's trunk, its energies and the fold itself (one (L x R*W) @ (R*W x h1)
    product per channel, and the energies' bias). The folded matrix is dense whatever the first layer's mask,
    so its nonzero count equals its dense-kernel count."""
    s = model.spec
    first = model.scorer.body[0]
    h1, cl = first.weight.shape[0], s.trunk_channels * s.feature_length
    cr = s.trunk_channels * s.regions if s.energies else 0
    per_pair = 2 * h1 * (cl + cr)
    rest = count_flops(model.scorer, s.interaction_dim)
    first_dense = 2 * first.weight.numel()
    first_nz = 2 * int(torch.count_nonzero(first.weight))
    per_pair += _residual_flops(model)
    pair = Flops(per_pair + rest.dense_kernel - first_dense, per_pair + rest.nonzero - first_nz)
    fold = 2 * h1 * s.trunk_channels * s.regions * s.shifts * s.feature_length
    if s.energies:
        fold += 2 * cl + 2 * h1 * cr  # the query's energies and their product with their block of the layer
    return pair, _trunk_flops(model) + _retriever_flops(model) + Flops(fold, fold)


def plain_pair_cost(model: PairNetwork) -> tuple[Flops, Flops]:
    """(per pair, per query) FLOPs of the plain path against cached item inputs: per pair the correlation
    over shifts (and, for the 'positions' interaction, the item energies) and the whole scorer; per query the
    query's trunk (and its energies)."""
    s = model.spec
    cost = pair_cost(model)
    query = _trunk_flops(model) + _retriever_flops(model)
    if s.energies:
        e = 2 * s.trunk_channels * s.feature_length
        query = query + Flops(e, e)
    return cost.per_pair, query


@dataclass(frozen=True)
class PairFlops:
    """FLOPs of one pair model on its plain (unfolded) path, counted as the served kernels run them (the
    correlation's products include the block-Toeplitz zeros). `per_pair` is what the cascade pays per scored
    (q, x) with the item's inputs cached: the correlation (and, for 'positions', the item energies) and the
    scorer. `per_item` (trunk of x) and `per_query` (trunk of q) are paid once; `cache_floats_per_item` is
    the size of the cached item inputs (`PairNetwork.item_input_width`)."""

    per_pair: Flops
    interaction: Flops
    scorer: Flops
    per_item: Flops
    per_query: Flops
    cache_floats_per_item: int


def pair_cost(model: PairNetwork) -> PairFlops:
    s = model.spec
    trunk = _trunk_flops(model)
    padded = s.feature_length + 2 * s.max_shift
    if s.interaction == "positions":  # every item position against every query position (`cost_volume`)
        inter = 2 * padded * s.trunk_channels * s.feature_length
        if s.energies:  # per position, summed over channels: not cached
            inter += 2 * s.trunk_channels * s.feature_length
    else:  # one product per channel with the query's block-Toeplitz matrix (`correlate`), zeros included
        inter = 2 * s.trunk_channels * padded * s.regions * s.shifts
    scorer = count_flops(model.scorer, s.interaction_dim)
    inter += _residual_flops(model)
    interaction = Flops(inter, inter)
    return PairFlops(
        per_pair=interaction + scorer,
        interaction=interaction,
        scorer=scorer,
        per_item=trunk,
        per_query=trunk + _retriever_flops(model),
        cache_floats_per_item=model.item_input_width,
    )


def pair_flops(model: PairNetwork) -> Flops:
    """FLOPs per (q, x) pair as served to many items (`PairNetwork.flops` for large counts): the item's inputs
    come from the cache (counted once per item, `PairNetwork.item_input_flops`), the query is folded into the
    first layer ('channels' models; 'positions' models: the plain interaction and scorer)."""
    if model.spec.interaction != "channels":
        return plain_pair_cost(model)[0]
    return folded_pair_cost(model)[0]


def pair_query_flops(model: PairNetwork) -> Flops:
    """FLOPs paid once per query and variant on that path: the query's trunk (and energies) and the fold."""
    if model.spec.interaction != "channels":
        return plain_pair_cost(model)[1]
    return folded_pair_cost(model)[1]
