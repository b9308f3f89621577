"""The stage loop over a batch of queries: every step of a stage (sampling, gathering the members' item inputs,
the model, aggregation, the ranking key, the cut) runs once for all the queries of the batch and all their
clusters, as numpy or torch operations over concatenated arrays; no Python loop runs per cluster or per
member, and the loops per query do O(1) work (its random draws, its query's preparation).

A query's answer does not depend on which other queries share its batch, bit for bit:
- every random draw comes from the query's own generator, in the order a batch of one draws it; the draws are
  padded or stacked, never shared;
- every operation is row-wise (elementwise, per-row reductions and sorts, segment sums in member order), or a
  matrix product whose rows do not depend on the other rows of the call: CPU GEMM kernels change path with the
  row count, so a query's own chunk is padded to `models.inference.MIN_GEMM_ROWS` rows and a product shared by
  the batch to `models.pair.SHARED_GEMM_ROWS`, past the last change;
- what cannot be made row-wise (a query's own preparation, a gadget's packed sequences) runs per query;
- queries only share a call where the alone path would take the same branch (same widest cluster for the key
  matrix, all clusters of one member or not, the same utility for the ranking key, the same number of clusters
  for the cut); otherwise they are split into such groups.
`run_stages` of a single query is a batch of one, so the service, the benchmarks and the tests all run this
code."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cascade.config import Stage
from cascade.costs import stage_flops
from cascade.engine import CascadeResult, DeadlineExceeded, StageReport
from cascade.snapshot import Snapshot, Variant
from cascade.target import Target, ranking_keys, top_per_query
from models.aggregation import MemberOutputs, aggregate_many, get_aggregator, log_mean_posteriors
from models.inference import score_many
from models.scorer import prepare_many

__all__ = ["StageJob", "run_stages", "run_stages_many", "sample_members_many"]


@dataclass(frozen=True)
class StageJob:
    """One query's stage loop: a target, its k, stages resolved and checked by a plan, its seed and deadline."""

    target: Target
    k: int
    stages: tuple[Stage, ...]
    seed: int = 0
    deadline: float | None = None


# -- sampling, vectorised over the clusters of every query -----------------------------------------------------
def sample_members_many(
    offsets: np.ndarray, clusters: Sequence[np.ndarray], n: int, rngs: Sequence[np.random.Generator]
) -> tuple[np.ndarray, np.ndarray]:
    """`cascade.space.sample_members` for several queries at once, each with its own clusters and generator:
    the rows grouped by query, then by cluster, and the count per cluster (concatenated). Each query draws
    exactly what it draws alone, so its rows are the ones it samples alone."""
    starts = [offsets[c] for c in clusters]
    sizes = [offsets[c + 1] - s for c, s in zip(clusters, starts, strict=True)]
    counts = [np.minimum(z, n) for z in sizes]
    rows: list[np.ndarray | None] = [None] * len(clusters)
    dense: dict[int, list[int]] = defaultdict(list)  # widest cluster -> queries sampled by a key matrix
    draws: list[np.ndarray | None] = [None] * len(clusters)
    one: list[int] = []
    for q, (s, z) in enumerate(zip(starts, sizes, strict=True)):
        if len(z) == 0:
            rows[q] = np.empty(0, dtype=np.int64)
            continue
        widest = int(z.max())
        if widest <= n:  # every member is taken: no draws
            seg = np.repeat(np.arange(len(z)), z)
            rows[q] = (s[seg] + np.arange(len(seg)) - (np.cumsum(z) - z)[seg]).astype(np.int64)
        elif n == 1:
            draws[q] = rngs[q].random(len(z))
            one.append(q)
        elif len(z) * widest <= 4 * int(z.sum()):
            draws[q] = rngs[q].random((len(z), widest))
            dense[widest].append(q)
        else:  # very uneven clusters: the query's own sort over the members present
            from cascade.space import _sample_sorted_keys

            rows[q] = _sample_sorted_keys(s, z, counts[q], rngs[q])
    if one:
        s = np.concatenate([starts[q] for q in one])
        z = np.concatenate([sizes[q] for q in one])
        picked = s + (np.concatenate([draws[q] for q in one]) * z).astype(np.int64)  # type: ignore[misc]
        _scatter(rows, one, picked, [len(sizes[q]) for q in one])
    for widest, qs in dense.items():
        keys = np.concatenate([draws[q] for q in qs])  # type: ignore[misc]
        s = np.concatenate([starts[q] for q in qs])
        z = np.concatenate([sizes[q] for q in qs])
        keys[np.arange(widest)[None, :] >= z[:, None]] = np.inf
        pick = np.argpartition(keys, n - 1, axis=1)[:, :n]
        valid = pick < z[:, None]
        picked = (s[:, None] + pick)[valid].astype(np.int64)
        _scatter(rows, qs, picked, [int(counts[q].sum()) for q in qs])
    return np.concatenate(rows) if rows else np.empty(0, dtype=np.int64), (  # type: ignore[arg-type]
        np.concatenate(counts) if counts else np.empty(0, dtype=np.int64)
    )


def _scatter(rows: list, queries: list[int], values: np.ndarray, lengths: list[int]) -> None:
    """Split `values` (the concatenation over `queries`) back into each query's slot of `rows`."""
    ends = np.cumsum(lengths)
    for q, a, b in zip(queries, ends - np.asarray(lengths), ends, strict=True):
        rows[q] = values[a:b]


def _extend_many(
    offsets: np.ndarray,
    clusters: Sequence[np.ndarray],
    rows: np.ndarray,
    counts: np.ndarray,
    n: int,
    rngs: Sequence[np.random.Generator],
) -> tuple[np.ndarray, np.ndarray]:
    """For a stage that extends the one before (same variant), several queries at once: new members for each
    cluster so that, with the ones already scored (`rows`, `counts`: concatenated over queries, grouped by
    cluster), it has min(n, size); uniform among those not scored yet. Each query draws what it draws alone."""
    all_clusters = np.concatenate(clusters) if clusters else np.empty(0, dtype=np.int64)
    starts = offsets[all_clusters]
    sizes = offsets[all_clusters + 1] - starts
    need = np.maximum(np.minimum(sizes, n) - counts, 0)
    bounds = np.cumsum([0, *(len(c) for c in clusters)])
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(clusters)
    by_widest: dict[int, list[int]] = defaultdict(list)
    draws: dict[int, np.ndarray] = {}
    for q in range(len(clusters)):
        a, b = bounds[q], bounds[q + 1]
        if a == b or not need[a:b].any():  # alone: no draw at all
            continue
        widest = int(sizes[a:b].max())
        draws[q] = rngs[q].random((b - a, widest))
        by_widest[widest].append(q)
    seg_all = np.repeat(np.arange(len(all_clusters)), counts)
    for widest, qs in by_widest.items():
        keys = np.concatenate([draws[q] for q in qs])
        sel = np.concatenate([np.arange(bounds[q], bounds[q + 1]) for q in qs])  # their clusters' positions
        keys[np.arange(widest)[None, :] >= sizes[sel][:, None]] = np.inf  # padding
        local = np.full(len(all_clusters), -1, dtype=np.int64)
        local[sel] = np.arange(len(sel))
        scored = local[seg_all] >= 0
        keys[local[seg_all[scored]], rows[scored] - starts[seg_all[scored]]] = np.inf  # already scored
        order = np.argsort(keys, axis=1, kind="stable")
        take = np.arange(widest)[None, :] < need[sel][:, None]
        picked = (starts[sel][:, None] + order)[take].astype(np.int64)
        _scatter(out, qs, picked, [int(need[bounds[q] : bounds[q + 1]].sum()) for q in qs])
    return (np.concatenate(out) if out else np.empty(0, dtype=np.int64)), need


# -- the batch's state between stages ---------------------------------------------------------------------------
@dataclass
class _Batch:
    """The live queries of a batch and, per query, its surviving clusters. Arrays over "query rows" (members)
    are concatenated in query order, clusters in the order of `alive`; arrays over "unit rows" (one unit per
    example of a query) repeat a query's rows once per example."""

    jobs: list[StageJob]
    index: list[int]  # position of each live query in the caller's list
    alive: list[np.ndarray]
    rngs: list[np.random.Generator]
    scored: _Scored | None = None


@dataclass(frozen=True)
class _Scored:
    """What a stage scored, for a next stage of the same variant to extend (per query: its rows grouped by
    cluster; per unit: outputs in the order of its query's rows; the prepared queries)."""

    variant: str
    rows: np.ndarray
    counts: np.ndarray
    logits: torch.Tensor
    hidden: torch.Tensor
    prepared: list[object]
    prepared_for: list[int]


def _units(jobs: Sequence[StageJob]) -> tuple[np.ndarray, list[torch.Tensor | None]]:
    """The query of every unit (one per example) and the unit's query tensor."""
    owner = np.repeat(np.arange(len(jobs)), [len(j.target.queries) for j in jobs])
    return owner, [q for j in jobs for q in j.target.queries]


def _unit_index(owner: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions, in an array concatenated over queries (`lengths` entries each), of every unit's entries: a
    unit reads its query's."""
    starts = np.cumsum(lengths) - lengths
    per_unit = lengths[owner]
    seg = np.repeat(np.arange(len(owner)), per_unit)
    return starts[owner][seg] + np.arange(int(per_unit.sum())) - (np.cumsum(per_unit) - per_unit)[seg]


def _per_query(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum of `values` (one per cluster, concatenated over queries with `lengths` clusters each) per query."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    return np.bincount(owner, weights=values, minlength=len(lengths)).astype(np.int64)


# -- one stage for every live query -----------------------------------------------------------------------------
def _group_positions(counts: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Positions, in a grouped array with these counts, of the members of `groups` (in that order)."""
    starts = np.cumsum(counts) - counts
    sel = counts[groups]
    seg = np.repeat(np.arange(len(groups)), sel)
    return (starts[groups][seg] + np.arange(int(sel.sum())) - (np.cumsum(sel) - sel)[seg]).astype(np.int64)


def run_stages(
    snapshot: Snapshot,
    target: Target,
    k: int,
    stages: Sequence[Stage],
    seed: int = 0,
    deadline: float | None = None,
) -> CascadeResult:
    """The stage loop of one query (a batch of one): `stages` as a plan resolved and checked them
    (`cascade.plan`), at least one, with k within the candidates. `deadline`: a `time.monotonic()` instant;
    past it, the next stage raises DeadlineExceeded instead of running (the service has answered 504 by then
    and wants its worker back)."""
    result = run_stages_many(snapshot, [StageJob(target, k, tuple(stages), seed, deadline)])[0]
    if isinstance(result, DeadlineExceeded):
        raise result
    return result


def run_stages_many(snapshot: Snapshot, jobs: Sequence[StageJob]) -> list[CascadeResult | DeadlineExceeded]:
    """The stage loop for every job at once (jobs with the same stage list share every step; other stage lists
    run as their own batches). A job whose deadline passes before one of its stages gets DeadlineExceeded in
    its place and leaves the batch; the others go on."""
    results: list[CascadeResult | DeadlineExceeded | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[(job.stages, job.target.kind)].append(i)
    for members in groups.values():
        for i, result in zip(members, _run_group(snapshot, [jobs[i] for i in members]), strict=True):
            results[i] = result
    return results  # type: ignore[return-value]


def _run_group(snapshot: Snapshot, jobs: list[StageJob]) -> list[CascadeResult | DeadlineExceeded]:
    stages = jobs[0].stages
    space = snapshot.space
    out: list[CascadeResult | DeadlineExceeded | None] = [None] * len(jobs)
    batch = _Batch(
        jobs=list(jobs),
        index=list(range(len(jobs))),
        alive=[j.target.candidates if j.target.candidates is not None else np.arange(space.num_clusters) for j in jobs],
        rngs=[np.random.default_rng(j.seed) for j in jobs],
    )
    reports: list[list[StageReport]] = [[] for _ in jobs]
    final: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    costs: dict[tuple, tuple[int, int]] = {}  # per stage: equal queries cost the same, counted once
    for i, stage in enumerate(stages):
        now = time.monotonic()
        late = [j for j, job in enumerate(batch.jobs) if job.deadline is not None and now > job.deadline]
        if late:
            for j in late:
                out[batch.index[j]] = DeadlineExceeded(f"deadline passed before stage {i} ({stage.variant})")
            batch = _drop(batch, late)
            if not batch.jobs:
                break
        started = time.perf_counter()
        variant = snapshot.variants[stage.variant]
        last = i == len(stages) - 1
        following = None if last else stages[i + 1].variant
        keep_q = [j.k if last else min(stage.keep or j.k, len(a)) for j, a in zip(batch.jobs, batch.alive, strict=True)]
        stage_out = _stage(snapshot, batch, stage, variant, keep_q, following == stage.variant)
        ms = (time.perf_counter() - started) * 1000.0
        costs.clear()
        for j, job in enumerate(batch.jobs):
            key = (stage_out.items[j], stage_out.members[j], stage_out.prepared_for[j], len(job.target.queries))
            if key not in costs:
                items, members, prepared_for, examples = key
                costs[key] = stage_flops(
                    variant, stage.aggregator, items, dict(members), len(variant.log_prior), examples, prepared_for
                )
            flops, dense_kernel = costs[key]
            reports[batch.index[j]].append(
                StageReport(
                    variant=variant.name,
                    version=variant.version,
                    aggregator=stage.aggregator,
                    clusters_in=len(batch.alive[j]),
                    kept=len(stage_out.top[j]),
                    samples=stage.samples,
                    items=stage_out.items[j],
                    flops=flops,
                    flops_dense_kernel=dense_kernel,
                    ms=ms,
                )
            )
        batch.alive = [a[t] for a, t in zip(batch.alive, stage_out.top, strict=True)]
        batch.scored = stage_out.scored
        if last:
            for j, q in enumerate(batch.index):
                final[q] = stage_out.kept_log_post[j], stage_out.kept_keys[j]
    for j, q in enumerate(batch.index):
        if out[q] is not None or q not in final:
            continue
        log_post, keys = final[q]
        post = log_post.exp()
        utility = torch.from_numpy(jobs[q].target.utility).double()
        out[q] = CascadeResult(
            cluster_ids=batch.alive[j],
            scores=(post @ utility).numpy(),
            posteriors=post.float().numpy(),
            stages=reports[q],
            snapshot_id=snapshot.id,
            ranking_values=keys.numpy(),
            ranking=jobs[q].target.ranking,
        )
    return out  # type: ignore[return-value]


def _drop(batch: _Batch, gone: list[int]) -> _Batch:
    """The batch without the queries at positions `gone` (and without their scored members)."""
    keep = np.ones(len(batch.jobs), dtype=bool)
    keep[gone] = False
    stay = np.flatnonzero(keep)
    scored = batch.scored
    if scored is not None:
        clusters_q = np.array([len(a) for a in batch.alive], dtype=np.int64)
        rows_q = _per_query(scored.counts, clusters_q)
        owner, _ = _units(batch.jobs)
        units = np.flatnonzero(keep[owner])
        t = torch.from_numpy(np.flatnonzero(np.repeat(keep[owner], rows_q[owner])))
        scored = _Scored(
            scored.variant,
            scored.rows[np.repeat(keep, rows_q)],
            scored.counts[np.repeat(keep, clusters_q)],
            scored.logits[t],
            scored.hidden[t] if scored.hidden.numel() else scored.hidden,
            [scored.prepared[u] for u in units],
            [scored.prepared_for[u] for u in units],
        )
    return _Batch(
        [batch.jobs[j] for j in stay],
        [batch.index[j] for j in stay],
        [batch.alive[j] for j in stay],
        [batch.rngs[j] for j in stay],
        scored,
    )


def _range(lengths: np.ndarray, q: int) -> tuple[int, int]:
    start = int(lengths[:q].sum())
    return start, start + int(lengths[q])


@dataclass(frozen=True)
class _StageOut:
    top: list[np.ndarray]
    items: list[int]
    members: list[tuple[tuple[int, int], ...]]
    prepared_for: list[int | None]
    scored: _Scored | None
    kept_log_post: list[torch.Tensor]
    kept_keys: list[torch.Tensor]


def _stage(
    snapshot: Snapshot, batch: _Batch, stage: Stage, variant: Variant, keep_q: list[int], carry: bool
) -> _StageOut:
    space = snapshot.space
    jobs = batch.jobs
    owner, queries = _units(jobs)
    clusters_q = np.array([len(a) for a in batch.alive], dtype=np.int64)
    prev = batch.scored
    extend = prev is not None and prev.variant == stage.variant
    if extend:
        assert prev is not None
        new_rows, new_counts = _extend_many(
            space.offsets, batch.alive, prev.rows, prev.counts, stage.samples, batch.rngs
        )
    else:
        new_rows, new_counts = sample_members_many(space.offsets, batch.alive, stage.samples, batch.rngs)
    new_q = _per_query(new_counts, clusters_q)
    if extend:
        assert prev is not None
        # per cluster, the members scored before first, then the new ones (a stable sort by cluster)
        cluster_of = np.concatenate(
            [np.repeat(np.arange(len(prev.counts)), prev.counts), np.repeat(np.arange(len(new_counts)), new_counts)]
        )
        order = np.argsort(cluster_of, kind="stable")
        rows = np.concatenate([prev.rows, new_rows])[order]
        counts = prev.counts + new_counts
        # the same order over unit rows (each unit repeats its query's rows)
        unit_cluster = np.concatenate(
            [
                _unit_cluster_ids(owner, prev.counts, clusters_q),
                _unit_cluster_ids(owner, new_counts, clusters_q),
            ]
        )
        unit_order = torch.from_numpy(np.argsort(unit_cluster, kind="stable"))
    else:
        rows, counts = new_rows, new_counts
    unit_counts = counts if len(owner) == len(jobs) else counts[_unit_index(owner, clusters_q)]
    unit_items = [slice(*_range(new_q, q)) for q in owner]
    examples_q = np.bincount(owner, minlength=len(jobs))
    starts = np.cumsum(clusters_q) - clusters_q
    members = [_members(counts[starts[q] : starts[q] + clusters_q[q]]) for q in range(len(jobs))]
    agg = get_aggregator(stage.aggregator)
    with torch.inference_mode():
        x = snapshot.item_inputs(variant, torch.from_numpy(new_rows))
        if extend:
            assert prev is not None
            prepared, prepared_for = prev.prepared, prev.prepared_for
        else:
            prepared = prepare_many(variant.model, list(queries), [int(new_q[q]) for q in owner])
            prepared_for = [int(new_q[q]) for q in owner]
        logits, hidden = score_many(variant.model, prepared, [x[items] for items in unit_items])
        if not (agg.needs_hidden or carry):
            hidden = hidden[:0]
        if extend:
            assert prev is not None
            logits = torch.cat([prev.logits, logits])[unit_order]
            if agg.needs_hidden or carry:  # the stage before kept them: it carried its members to this one
                hidden = torch.cat([prev.hidden, hidden])[unit_order]
        outputs = MemberOutputs(logits, hidden)
        log_post = aggregate_many(
            stage.aggregator, outputs, unit_counts, clusters_q[owner], variant.log_prior, variant.gadget
        )
        log_post = log_mean_posteriors(log_post, examples_q, clusters_q)
        keys = ranking_keys(log_post, [j.target for j in jobs], clusters_q)
        top = top_per_query(keys, clusters_q, keep_q)
    scored = None
    if carry:
        groups = np.concatenate([starts[q] + top[q] for q in range(len(jobs))])
        keep_rows = _group_positions(counts, groups)
        kept_counts = counts[groups]
        # the same selection over unit rows
        unit_starts = np.cumsum(clusters_q[owner]) - clusters_q[owner]
        unit_groups = np.concatenate([unit_starts[u] + top[q] for u, q in enumerate(owner)])
        t = torch.from_numpy(_group_positions(unit_counts, unit_groups))
        scored = _Scored(
            stage.variant,
            rows[keep_rows],
            kept_counts,
            logits[t],
            hidden[t] if hidden.numel() else hidden,
            prepared,
            prepared_for,
        )
    kept_lp = [log_post[starts[q] + top[q]] for q in range(len(jobs))]
    kept_keys = [keys[starts[q] + top[q]] for q in range(len(jobs))]
    return _StageOut(
        top=top,
        items=[int(v) for v in new_q],
        members=members,
        prepared_for=[prepared_for[int(np.flatnonzero(owner == q)[0])] if extend else None for q in range(len(jobs))],
        scored=scored,
        kept_log_post=kept_lp,
        kept_keys=kept_keys,
    )


def _unit_cluster_ids(owner: np.ndarray, counts: np.ndarray, clusters_q: np.ndarray) -> np.ndarray:
    """For every unit row (members grouped by cluster, units in order), a cluster id unique over units."""
    per_unit = counts if len(owner) == len(clusters_q) else counts[_unit_index(owner, clusters_q)]
    return np.repeat(np.arange(len(per_unit)), per_unit)


def _members(counts: np.ndarray) -> tuple[tuple[int, int], ...]:
    """((members per cluster, clusters), ...): what the aggregation's FLOPs depend on."""
    times = np.bincount(counts)
    return tuple((int(n), int(times[n])) for n in np.flatnonzero(times))
