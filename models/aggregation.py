"""Shared-label aggregation: the n members of a cluster share its label, so their n outputs combine into one
posterior over it. Many tuples at once, each a contiguous run of member rows, any n >= 1 per tuple. Every
aggregator returns normalised log posteriors, one row per tuple."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "MemberOutputs",
    "Aggregator",
    "register_aggregator",
    "get_aggregator",
    "list_aggregators",
    "aggregate",
    "aggregate_many",
    "log_mean_posteriors",
    "segment_ids",
    "log_softmax_rows",
    "AGGREGATORS",
    "entropy",
    "log_prior_of",
    "impossible_classes",
    "IMPOSSIBLE_LOG_PRIOR",
    "lstm",
    "deepsets",
]


@dataclass(frozen=True)
class MemberOutputs:
    """What one network said about every member: logits (M x C) and hidden representations h (M x H)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


AggregatorFn = Callable[[MemberOutputs, torch.Tensor, torch.Tensor, nn.Module | None], torch.Tensor]


@dataclass(frozen=True)
class Aggregator:
    name: str
    fn: AggregatorFn
    needs_hidden: bool
    needs_gadget: bool
    flops: Callable[[int, int, nn.Module | None], int]
    """FLOPs of aggregating one tuple of n members with C classes (beyond the n network passes)."""


AGGREGATORS: dict[str, Aggregator] = {}


def _elementwise_flops(n: int, num_classes: int, _gadget: nn.Module | None = None) -> int:
    """One accumulate per member and class; normalisation is O(C) and ignored."""
    return n * num_classes


def register_aggregator(
    name: str,
    *,
    needs_hidden: bool = False,
    needs_gadget: bool = False,
    flops: Callable[[int, int, nn.Module | None], int] = _elementwise_flops,
) -> Callable[[AggregatorFn], AggregatorFn]:
    def decorate(fn: AggregatorFn) -> AggregatorFn:
        if name in AGGREGATORS:
            raise ValueError(f"aggregator {name!r} registered twice")
        AGGREGATORS[name] = Aggregator(name, fn, needs_hidden, needs_gadget, flops)
        return fn

    return decorate


def get_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise KeyError(f"unknown aggregator {name!r}; known: {', '.join(sorted(AGGREGATORS))}") from None


def list_aggregators() -> list[str]:
    return sorted(AGGREGATORS)


def segment_ids(counts: torch.Tensor) -> torch.Tensor:
    """Tuple index of every member row, for contiguous runs of the given lengths."""
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def log_softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.log_softmax(1)`, computed as x - logsumexp(x): on narrow (N x 10) tensors torch's CPU log_softmax kernel
    was measured slower (second session, not re-measured since), and stage 1 of a rare-target query calls it twice."""
    return x - x.logsumexp(1, keepdim=True)


def _segment_sum(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(counts), values.shape[1], dtype=values.dtype)
    return out.index_add_(0, segment_ids(counts), values)


def aggregate(
    name: str,
    outputs: MemberOutputs,
    counts: torch.Tensor,
    log_prior: torch.Tensor,
    gadget: nn.Module | None = None,
) -> torch.Tensor:
    """Log posteriors (T x C) of T tuples whose members are the rows of `outputs`, `counts[t]` rows each."""
    agg = get_aggregator(name)
    counts = counts.long()
    if int(counts.sum()) != len(outputs.logits) or bool((counts < 1).any()):
        raise ValueError("counts must be positive and add up to the number of member rows")
    if agg.needs_hidden and outputs.hidden is None:
        raise ValueError(f"aggregator {name!r} needs hidden representations")
    if agg.needs_gadget and gadget is None:
        raise ValueError(f"aggregator {name!r} needs a trained gadget for this variant")
    return agg.fn(outputs, counts, log_prior, gadget)


def aggregate_many(
    name: str,
    outputs: MemberOutputs,
    counts: np.ndarray,
    tuples: np.ndarray,
    log_prior: torch.Tensor,
    gadget: nn.Module | None = None,
) -> torch.Tensor:
    """`aggregate` of several independent sets of tuples at once (the stage loop's units: one per query and
    example), each set's rows what `aggregate` gives that set alone, bit for bit. `tuples[s]`: how many tuples
    set s has; `counts`: members per tuple, concatenated over the sets in order, as the member rows of
    `outputs` are. One call where the sets take the same branch of the aggregator as they do alone (every tuple
    of one member, or not), one per branch otherwise; a gadget set by set (its packed sequences are not
    row-wise)."""
    agg = get_aggregator(name)
    set_of_tuple = np.repeat(np.arange(len(tuples)), tuples)
    rows = np.bincount(set_of_tuple, weights=counts, minlength=len(tuples)).astype(np.int64)
    logits, hidden = outputs.logits, outputs.hidden
    if agg.needs_gadget:
        assert hidden is not None
        parts, row, t0 = [], 0, 0
        for n_rows, n_tuples in zip(rows.tolist(), np.asarray(tuples).tolist(), strict=True):
            members = MemberOutputs(logits[row : row + n_rows], hidden[row : row + n_rows])
            parts.append(aggregate(name, members, torch.from_numpy(counts[t0 : t0 + n_tuples]), log_prior, gadget))
            row, t0 = row + n_rows, t0 + n_tuples
        return torch.cat(parts)
    ones = np.bincount(set_of_tuple, weights=counts != 1, minlength=len(tuples)) == 0
    if ones.all() or not ones.any():
        return aggregate(name, outputs, torch.from_numpy(counts), log_prior)
    # both branches among the sets: each group in one call, then back in order
    row_flag = np.repeat(ones, rows)
    tuple_flag = np.repeat(ones, tuples)
    out = torch.empty(len(counts), logits.shape[1], dtype=torch.float32)
    for flag in (True, False):
        picked = torch.from_numpy(np.flatnonzero(row_flag == flag))
        t = np.flatnonzero(tuple_flag == flag)
        members = MemberOutputs(logits[picked], hidden[picked] if hidden is not None and hidden.numel() else hidden)
        out[torch.from_numpy(t)] = aggregate(name, members, torch.from_numpy(counts[t]), log_prior)
    return out


def log_mean_posteriors(log_post: torch.Tensor, sets: np.ndarray, tuples: np.ndarray) -> torch.Tensor:
    """For groups of `sets[g]` consecutive sets of `tuples[g]` log posteriors each (a query's examples, each
    with the query's clusters), the log of the mean posterior over a group's sets, as float64, concatenated over
    the groups; a group of one set is that set's rows."""
    lp = log_post.double()
    if (sets == 1).all():
        return lp
    parts, row = [], 0
    for g, e in enumerate(sets):
        c = int(tuples[g])
        total = lp[row : row + c]
        for j in range(1, e):
            total = torch.logaddexp(total, lp[row + j * c : row + (j + 1) * c])
        parts.append(total - math.log(e) if e > 1 else total)
        row += e * c
    return torch.cat(parts)


def _one_member_each(outputs: MemberOutputs, counts: torch.Tensor) -> bool:
    """Every tuple has a single member: then averaging and the product of experts are all that member's
    log-softmax, and the segment sums can be skipped (the first stage of a cascade often samples 1)."""
    return len(counts) == len(outputs.logits)


@register_aggregator("mean_prob")
def mean_prob(
    outputs: MemberOutputs, counts: torch.Tensor, log_prior: torch.Tensor, _g: nn.Module | None
) -> torch.Tensor:
    """The paper's baseline: average the members' softmax."""
    if _one_member_each(outputs, counts):
        return log_softmax_rows(outputs.logits.double()).float()
    probs = _segment_sum(log_softmax_rows(outputs.logits.double()).exp(), counts) / counts[:, None]
    return probs.clamp_min(1e-300).log().float()


@register_aggregator("mean_logit")
def mean_logit(
    outputs: MemberOutputs, counts: torch.Tensor, log_prior: torch.Tensor, _g: nn.Module | None
) -> torch.Tensor:
    """Average the logits, then softmax."""
    if _one_member_each(outputs, counts):
        return log_softmax_rows(outputs.logits.double()).float()
    return log_softmax_rows(_segment_sum(outputs.logits.double(), counts) / counts[:, None]).float()


IMPOSSIBLE_LOG_PRIOR = math.log(1e-11)
"""A log prior at or below this is a class the space does not hold (priors of 0 arrive clipped to 1e-12)."""


def impossible_classes(log_prior: torch.Tensor) -> torch.Tensor:
    """Mask of the classes with prior 0 (or clipped to ~1e-12), unless that would be every class."""
    mask = ~(log_prior.double() > IMPOSSIBLE_LOG_PRIOR)  # NaN and -inf count as impossible too
    return mask if not bool(mask.all()) else torch.zeros_like(mask)


@register_aggregator("bayes")
def bayes(outputs: MemberOutputs, counts: torch.Tensor, log_prior: torch.Tensor, _g: nn.Module | None) -> torch.Tensor:
    """Product of experts: sum_i log p(y|x_i) - (n - 1) log pi(y); exact for members independent given y.
    A class the space cannot hold (prior 0) gets no mass: -(n - 1) log pi would otherwise reward it without
    bound (with pi clipped to 1e-12, by 27.6 nats per extra member), so it is masked to -inf."""
    impossible = impossible_classes(log_prior)
    if _one_member_each(outputs, counts):
        summed = outputs.logits.double()
    else:
        summed = _segment_sum(log_softmax_rows(outputs.logits.double()), counts)
        summed -= (counts[:, None] - 1).double() * log_prior.double().masked_fill(impossible, 0.0)[None, :]
    if bool(impossible.any()):
        summed = summed.masked_fill(impossible[None, :], -torch.inf)
    return log_softmax_rows(summed).float()


def entropy(prior: torch.Tensor) -> float:
    """H(pi) in nats."""
    p = prior.double()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def log_prior_of(prior: torch.Tensor) -> torch.Tensor:
    return prior.double().clamp_min(1e-12).log().float()


def _gadget_flops(kind: str) -> Callable[[int, int, nn.Module | None], int]:
    def flops(n: int, num_classes: int, gadget: nn.Module | None = None) -> int:
        if gadget is None:
            raise ValueError(f"the FLOPs of {kind!r} depend on its trained gadget; pass it")
        return int(gadget.flops(n))  # type: ignore[operator]

    return flops


def _run_gadget(kind: str, outputs: MemberOutputs, counts: torch.Tensor, gadget: nn.Module | None) -> torch.Tensor:
    spec = getattr(gadget, "spec", None)
    if getattr(spec, "kind", None) != kind:
        raise ValueError(f"aggregator {kind!r} needs a {kind} gadget, got {getattr(spec, 'kind', type(gadget))}")
    assert outputs.hidden is not None and gadget is not None
    if outputs.hidden.shape[1] != spec.input_dim:  # type: ignore[union-attr]
        raise ValueError(f"the gadget reads {spec.input_dim}-dim hidden representations, got {outputs.hidden.shape[1]}")  # type: ignore[union-attr]
    was_training = gadget.training
    gadget.eval()
    try:
        with torch.no_grad():
            logits = gadget(outputs.hidden, counts)
    finally:
        gadget.train(was_training)
    return log_softmax_rows(logits.double()).float()


@register_aggregator("lstm", needs_hidden=True, needs_gadget=True, flops=_gadget_flops("lstm"))
def lstm(
    outputs: MemberOutputs, counts: torch.Tensor, log_prior: torch.Tensor, gadget: nn.Module | None
) -> torch.Tensor:
    """The paper's gadget: an LSTM over the members' hidden representations (see `models.gadget`)."""
    return _run_gadget("lstm", outputs, counts, gadget)


@register_aggregator("deepsets", needs_hidden=True, needs_gadget=True, flops=_gadget_flops("deepsets"))
def deepsets(
    outputs: MemberOutputs, counts: torch.Tensor, log_prior: torch.Tensor, gadget: nn.Module | None
) -> torch.Tensor:
    """Mean of the hidden representations, then a small trained head (see `models.gadget`)."""
    return _run_gadget("deepsets", outputs, counts, gadget)
