"""The query plan: what answers a query, decided once, and the one function that carries it out.

`plan_query` turns a request (`Query`) and a snapshot into a `QueryPlan`: the target, which path answers (the
exact table, the cascade, or the embedding index alone), the stages resolved and checked once, what each will
cost, and the cost budget checked before anything runs. `execute` runs a plan and returns its answer: a
`CascadeResult` with one report per stage (cascade, FAISS only), or an `ExactAnswer` (the table's lookup). The
service's route, `prunecascade evaluate` and the benchmarks all go through these two, so nothing else decides
the path; the stage loop (`cascade.stage_loop`) runs the stages."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from cascade.config import scale_keeps
from cascade.costs import dense_flops, planned_stage_flops
from cascade.engine import CascadeResult, DeadlineExceeded, faiss_answer
from cascade.errors import ExactTableNotReady, RequestError
from cascade.exact import ExactAnswer, ExactTable, lookup_flops
from cascade.queries import default_gains
from cascade.reader import check_of, reader_answer, serves
from cascade.reader import planned_flops as reader_flops
from cascade.snapshot import Snapshot
from cascade.stage import Stage, check_stages
from cascade.stage_loop import StageJob, run_stages, run_stages_many
from cascade.target import Target
from cascade.tuning_record import PlanPoint, TuningRecord

if TYPE_CHECKING:
    from cascade.batcher import Batcher, Expected

__all__ = [
    "Query",
    "Limits",
    "QueryPlan",
    "Path",
    "Answer",
    "plan_query",
    "plan_target",
    "plan_reader",
    "execute",
    "execute_many",
    "plan_for_quality",
    "quality_note",
    "reader_dominates",
    "QualityUnmet",
    "run_cascade",
    "resolve_stages",
    "target_of",
    "target_from_label",
    "target_from_utility",
    "target_from_examples",
]

Path = Literal["exact", "cascade", "faiss", "reader"]
"""What answers: the exact table, the cascade of models, the embedding index alone (a query by example with
`stages: []`), or the cluster reader over the index's top candidates (a query by example's default where the
reader beat FAISS alone on dev queries, `cascade.reader`)."""

Mode = Literal["auto", "exact", "cascade"]

Answer = CascadeResult | ExactAnswer
"""What `execute` returns: the cascade's ranking with one report per stage (none for FAISS only), or the exact
table's."""


@dataclass(frozen=True)
class Query:
    """A request in the engine's terms: exactly one of `label`, `utility` or `examples` (the HTTP schema has
    checked that), and how to answer it (`mode`, `stages`, `candidates`, or a `quality` that picks both)."""

    label: int | None = None
    utility: Sequence[float] | np.ndarray | None = None
    examples: Sequence[Sequence[float]] | np.ndarray | None = None
    gains: Sequence[float] | None = None
    k: int = 10
    mode: Mode = "auto"
    stages: Sequence[Stage] | None = None  # None: the snapshot's default cascade for the target
    candidates: int | None = None  # a query by example's stage 0 (clusters the embedding proposes)
    quality: float | None = None  # the cheapest plan on the tuned front that meets it: its stages and candidates


@dataclass(frozen=True)
class Limits:
    """What a server allows one query (its settings); the defaults allow anything a snapshot can answer."""

    max_k: int | None = None
    max_examples: int | None = None
    example_candidates: int = 200  # stage 0's M when the query does not say
    max_flops: int | None = None  # the cost budget, checked on the plan


@dataclass(frozen=True)
class QueryPlan:
    """Everything decided about a query before anything runs. `stage_flops[i]` is stage i's cost as
    `costs.stage_flops` counts it, assuming every surviving cluster has at least `samples` members (exact
    where they do, an upper bound otherwise); `flops` adds the target's own cost (embedding the examples), or is
    the table lookup's for the exact path."""

    snapshot: Snapshot
    target: Target
    k: int
    path: Path
    stages: tuple[Stage, ...] = ()  # () for the exact and FAISS-only paths
    stage_flops: tuple[int, ...] = ()
    table: ExactTable | None = None  # the exact path's table
    flops: int = 0
    dense_flops: int = 0  # what the dense exhaustive oracle would cost: the yardstick of every answer


def plan_query(
    snapshot: Snapshot,
    query: Query,
    limits: Limits = Limits(),
    exact_table: Callable[[Snapshot], ExactTable | None] | None = None,
) -> QueryPlan:
    """The plan for `query` on `snapshot`. `exact_table` finds the snapshot's exact table (None while it is
    built, or when there is none); label and utility targets use it unless the query asks for the cascade
    (`mode`, `stages`). A `quality` takes the stages and candidates of the cheapest plan on the snapshot's tuned
    front that meets it. Raises RequestError naming the offending field, ExactTableNotReady for `mode: exact`
    before the table is built."""
    if query.quality is not None:
        query = _with_quality_plan(snapshot, query)
    if limits.max_k is not None and query.k > limits.max_k:
        raise RequestError("k", f"at most {limits.max_k}")
    target = target_of(snapshot, query, limits)
    if query.mode == "exact" and query.stages is not None:
        raise RequestError("mode", "an exact answer runs no stages; drop stages or use mode cascade")
    if query.mode == "exact" and target.kind != "classifier":
        raise RequestError("mode", "a query by example is read by the pair models with every item: no exact table")
    table = None
    if target.kind == "classifier" and query.mode != "cascade" and query.stages is None and exact_table is not None:
        table = exact_table(snapshot)
    if table is None and query.mode == "exact":
        raise ExactTableNotReady("the exact table for this dense model is still being built")
    return plan_target(
        snapshot,
        target,
        query.k,
        query.stages,
        table=table,
        max_flops=limits.max_flops,
        reader=query.mode == "auto",
    )


def _with_quality_plan(snapshot: Snapshot, query: Query) -> Query:
    """The query with the stages and M of the cheapest plan on the tuned front that meets its quality, or, where
    the cluster reader dominates that plan (`reader_dominates`), the query as the reader answers it by default."""
    if query.stages is not None or query.candidates is not None:
        raise RequestError("quality", "give a quality or stages and candidates, not both")
    if query.examples is None:
        raise RequestError("quality", "a quality picks a plan of the pair cascade: it needs a query by example")
    try:
        point = plan_for_quality(snapshot.config.pair_tuning, query.quality or 0.0)
    except QualityUnmet as exc:
        raise RequestError("quality", str(exc)) from None
    if query.mode == "auto" and reader_dominates(snapshot, point):  # mode cascade asks for the pair cascade
        return replace(query, quality=None)
    return replace(query, stages=point.stages, candidates=point.candidates, quality=None)


def target_of(snapshot: Snapshot, query: Query, limits: Limits = Limits()) -> Target:
    """The query's target on this snapshot: a label, a utility over classes, or examples."""
    if query.gains is not None and query.examples is None:
        raise RequestError("target.gains", "gains weigh relevance grades of a query by example; use examples")
    if query.candidates is not None and query.examples is None:
        raise RequestError("candidates", "candidates (stage 0's M) apply to a query by example only")
    if query.label is not None:
        return target_from_label(snapshot, query.label)
    if query.utility is not None:
        return target_from_utility(snapshot, query.utility)
    if query.examples is None:
        raise RequestError("target", "give exactly one of label, utility or examples")
    if limits.max_examples is not None and len(query.examples) > limits.max_examples:
        raise RequestError("target.examples", f"at most {limits.max_examples} examples per query")
    candidates = query.candidates or max(query.k, snapshot.config.pair_candidates or limits.example_candidates)
    return target_from_examples(snapshot, query.examples, candidates, query.gains)


def plan_target(
    snapshot: Snapshot,
    target: Target,
    k: int,
    stages: Sequence[Stage] | None = None,
    *,
    table: ExactTable | None = None,
    max_flops: int | None = None,
    reader: bool = True,
) -> QueryPlan:
    """The plan for a target already built: the exact table's lookup when `table` is given, else `stages` (None:
    the snapshot's default for the target: the cluster reader where it is served and `reader` allows it, else
    the default cascade with keeps scaled to k; []: FAISS only), resolved and checked once, costed, and held
    against `max_flops`."""
    if (
        table is None
        and stages is None
        and reader
        and target.kind == "pair"
        and not _ungraded(target)
        and serves(snapshot)
    ):  # the reader ranks by gains over the pair models' grades
        return plan_reader(snapshot, target, k, max_flops=max_flops)
    if table is not None:
        alive = table.num_clusters if target.candidates is None else len(target.candidates)
        _check_k(k, alive)
        path: Path = "exact"
        resolved, costs, flops = (), (), lookup_flops(alive, table.num_classes)
        oracle = table.build_flops  # the table is the oracle's pass over every member, counted as dense_flops does
    else:
        resolved = resolve_stages(snapshot, target, k, stages)
        oracle = 0 if _ungraded(target) else dense_flops(snapshot, target)
        costs = planned_stage_flops(snapshot, target, k, resolved)
        flops = target.flops + sum(costs)
        if max_flops is not None and flops > max_flops:
            field = "stages" if stages is not None else "k"
            raise RequestError(
                field,
                f"this query may cost {flops:,} FLOPs, over the server's budget of {max_flops:,} (max_query_flops)",
            )
        _check_k(k, len(target.candidates) if target.candidates is not None else snapshot.space.num_clusters)
        path = "cascade" if resolved else "faiss"
    return QueryPlan(snapshot, target, k, path, resolved, costs, table, flops, oracle)


def plan_reader(snapshot: Snapshot, target: Target, k: int, *, max_flops: int | None = None) -> QueryPlan:
    """The cluster reader's rerank of FAISS's top candidates for a query by example, whether or not it is served
    by default (the dev check measures it before it is)."""
    if snapshot.reader is None or target.candidates is None:
        raise RequestError("target", "this space has no cluster reader for queries by example")
    _check_k(k, len(target.candidates))
    cost = reader_flops(snapshot, target, k)
    flops = target.flops + cost
    if max_flops is not None and flops > max_flops:
        raise RequestError(
            "k", f"this query may cost {flops:,} FLOPs, over the server's budget of {max_flops:,} (max_query_flops)"
        )
    return QueryPlan(snapshot, target, k, "reader", (), (cost,), None, flops, dense_flops(snapshot, target))


def execute(
    plan: QueryPlan,
    seed: int = 0,
    deadline: float | None = None,
    batcher: Batcher | None = None,
    expected: Expected | None = None,
) -> Answer:
    """Carry out a plan. `seed` seeds the member sampling (same plan, same seed, same answer); `deadline`: a
    `time.monotonic()` instant past which the cascade stops between stages (DeadlineExceeded). `batcher`: the
    cascade runs in a batch with concurrent queries of the same stages (`cascade.batcher`), with the same
    answer as alone; `expected` is the query's announcement to it (`Batcher.expect`)."""
    if plan.path != "cascade" and expected is not None:
        expected.cancel()  # it runs no stages: a batch being formed need not wait for it
    if plan.path == "exact":
        assert plan.table is not None
        return plan.table.answer(plan.target, plan.k, plan.snapshot.id)
    if plan.path == "faiss":
        return faiss_answer(plan.snapshot, plan.target, plan.k)
    if plan.path == "reader":
        return reader_answer(plan.snapshot, plan.target, plan.k, seed, deadline, flops=plan.stage_flops[0])
    if batcher is not None:
        return batcher.run(plan.snapshot, StageJob(plan.target, plan.k, plan.stages, seed, deadline), expected)
    return run_stages(plan.snapshot, plan.target, plan.k, plan.stages, seed, deadline)


def execute_many(
    plans: Sequence[QueryPlan], seeds: Sequence[int], deadline: float | None = None
) -> list[Answer | DeadlineExceeded]:
    """Carry out several plans at once (a multi-query request): the cascades in one batch
    (`cascade.stage_loop.run_stages_many`), each answer the one `execute` gives it alone; a cascade whose
    deadline passes gets DeadlineExceeded in its place. Exact, FAISS-only and reader plans are answered one by one."""
    out: list[Answer | DeadlineExceeded | None] = [None] * len(plans)
    cascades = [i for i, p in enumerate(plans) if p.path == "cascade"]
    by_snapshot: dict[int, list[int]] = {}
    for i in cascades:
        by_snapshot.setdefault(id(plans[i].snapshot), []).append(i)
    for members in by_snapshot.values():
        jobs = [StageJob(plans[i].target, plans[i].k, plans[i].stages, seeds[i], deadline) for i in members]
        for i, result in zip(members, run_stages_many(plans[members[0]].snapshot, jobs), strict=True):
            out[i] = result
    for i, p in enumerate(plans):
        if p.path != "cascade":
            out[i] = execute(p, seeds[i], deadline)
    return out  # type: ignore[return-value]


def run_cascade(
    snapshot: Snapshot,
    target: Target,
    k: int,
    stages: Sequence[Stage] | None = None,
    seed: int = 0,
    deadline: float | None = None,
) -> CascadeResult:
    """`execute(plan_target(...))` for a target: the cascade (or FAISS only), never the exact table."""
    result = execute(plan_target(snapshot, target, k, stages), seed, deadline)
    assert isinstance(result, CascadeResult)
    return result


class QualityUnmet(LookupError):
    """No plan on the stored front reaches the quality asked for."""


def plan_for_quality(record: TuningRecord | None, quality: float) -> PlanPoint:
    """The cheapest plan on the stored front whose lower confidence bound of relative nDCG@10 reaches
    `quality`."""
    if record is None:
        raise QualityUnmet("this space's default cascade was not tuned (prunecascade tune): no front to choose from")
    for point in sorted(record.front, key=lambda p: (p.flops, p.ms)):
        if point.rel_ndcg_low >= quality:
            return point
    best = max((p.rel_ndcg_low for p in record.front), default=float("nan"))
    raise QualityUnmet(
        f"no plan on the tuned front reaches {quality:g} (the best lower bound is {best:.3f}); {record.reason}"
    )


def reader_dominates(snapshot: Snapshot, point: PlanPoint) -> bool:
    """Whether the cluster reader the space serves by default is at least as good as a tuned plan against the truth
    on dev queries (recall@1 and nDCG@10) at no more FLOPs per query. A quality is then answered by the reader: the
    front measures its plans against the dense rerank, which the reader is not among, and a plan the reader beats on
    every count is not worth its FLOPs."""
    reader = _default_reader_dev(snapshot)
    return reader is not None and (
        reader["recall_at_1"] >= point.recall_at_1
        and reader["ndcg_at_10"] >= point.ndcg
        and reader.get("flops", math.inf) <= point.flops
    )


def _default_reader_dev(snapshot: Snapshot) -> dict | None:
    """The dev figures of the reader where it is the default for queries by example, else None."""
    choice = check_of(snapshot)
    if choice is None or not serves(snapshot) or "reader" not in choice.dev:
        return None
    return choice.dev["reader"]


def quality_note(snapshot: Snapshot, quality: float, path: Path) -> str | None:
    """What an answer to a `quality` must say where the cluster reader is the default for queries by example: a
    quality picks among the pair cascade's plans, and the reader is not one of them; it answers in the plan's place
    where it dominates the plan (`reader_dominates`). `path`: what answered."""
    reader = _default_reader_dev(snapshot)
    if reader is None:
        return None
    point = plan_for_quality(snapshot.config.pair_tuning, quality)
    picked = (
        f"a quality of {quality:g} picks {point.name} on the tuned pair cascade's front (dev recall@1 "
        f"{point.recall_at_1:.3f}, nDCG@10 {point.ndcg:.3f}, {point.flops:,.0f} FLOPs per query)"
    )
    figures = f"dev recall@1 {reader['recall_at_1']:.3f}, nDCG@10 {reader['ndcg_at_10']:.3f}"
    if path == "reader":
        return (
            f"{picked}; the cluster reader, this space's default, does at least as well at no more FLOPs "
            f"({figures}, {reader['flops']:,.0f} FLOPs per query), so the reader answered"
        )
    return (
        f"{picked}; the default for queries by example here is the cluster reader ({figures}): leave out quality, "
        "stages and candidates to be answered by it"
    )


def _check_k(k: int, alive: int) -> None:
    if not 1 <= k <= alive:
        raise RequestError("k", f"must be between 1 and the {alive} candidate clusters, got {k}")


def target_from_label(snapshot: Snapshot, label: int) -> Target:
    """`label` is one of the user's labels (`Space.labels_known`); the target is over class indices."""
    space = snapshot.space
    index = space.class_of(label)
    if index is None:
        known = ", ".join(str(v) for v in space.labels_known)
        raise RequestError("target.label", f"unknown label {label}; this space's labels are {known}")
    utility = np.zeros(space.num_classes)
    utility[index] = 1.0
    return Target(utility=utility, label=index)


def target_from_utility(snapshot: Snapshot, utility: list[float] | np.ndarray) -> Target:
    u = np.asarray(utility, dtype=np.float64)
    if u.shape != (snapshot.space.num_classes,):
        raise RequestError("target.utility", f"needs {snapshot.space.num_classes} values, got {u.size}")
    if not np.isfinite(u).all():
        raise RequestError("target.utility", "values must be finite")
    if not (u != 0).any():
        raise RequestError("target.utility", "all weights are zero: every cluster would score 0")
    return Target(utility=u)


def _examples_array(snapshot: Snapshot, examples: list[list[float]] | np.ndarray) -> np.ndarray:
    try:
        x = np.asarray(examples, dtype=np.float32)
    except (ValueError, TypeError):
        raise RequestError("target.examples", "every example must be a list of numbers of the same length") from None
    if x.ndim != 2 or x.shape[1] != snapshot.space.input_dim or len(x) == 0:
        got = f"; got {x.shape[1]}" if x.ndim == 2 else ""
        raise RequestError("target.examples", f"each example needs {snapshot.space.input_dim} features{got}")
    if not np.isfinite(x).all():
        raise RequestError("target.examples", "values must be finite")
    return x


def _ungraded(target: Target) -> bool:
    """A query by example on a snapshot with no pair model served: answered by FAISS alone."""
    return target.kind == "pair" and target.utility.size == 0


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

    With a bi-encoder but no pair model served (a first run still training them, or a broken one): FAISS alone,
    the answer the service falls back to anyway. Without a bi-encoder (an older home, a space without clusters):
    the dense classifier's mean posterior over the examples is a utility over classes and the candidates come
    from the raw-feature index."""
    x = _examples_array(snapshot, examples)
    if snapshot.embedding is None:
        if gains is not None:
            raise RequestError("target.gains", "this space has no pair model, so no relevance grades")
        dense = snapshot.dense
        with torch.inference_mode():
            # a query's few examples: one forward pass of the dense classifier
            utility = dense.model.score(None, torch.from_numpy(x))[0].softmax(1).mean(0).double().numpy()
        nearest = snapshot.index.nearest_clusters(x, candidates)
        return Target(utility=utility, candidates=nearest, flops=len(x) * dense.flops.nonzero)
    num_grades = snapshot.num_grades
    if num_grades == 0:  # a bi-encoder but no pair model served: FAISS alone, no grades to weigh
        if gains is not None:
            raise RequestError("target.gains", "no pair model is served on this space yet, so no relevance grades")
        g = np.zeros(0)
    else:
        g = np.asarray(default_gains(num_grades) if gains is None else gains, dtype=np.float64)
        if g.shape != (num_grades,) or not np.isfinite(g).all():
            raise RequestError(
                "target.gains", f"needs {num_grades} finite values, one per relevance grade; got {g.size}"
            )
        if not (g != 0).any():
            raise RequestError("target.gains", "all gains are zero: every cluster would score 0")
    nearest, distances, vectors = snapshot.embedding.embed_and_search(x, candidates)
    queries = tuple(torch.from_numpy(row[None, :].copy()) for row in x)
    return Target(
        utility=g,
        kind="pair",
        queries=queries,
        candidates=nearest,
        candidate_distances=distances,
        embeddings=vectors,
        flops=len(x) * snapshot.embedding.flops_per_query,
    )


def resolve_stages(
    snapshot: Snapshot, target: Target, k: int, stages: tuple[Stage, ...] | list[Stage] | None
) -> tuple[Stage, ...]:
    """The stages a query runs: its own (checked as given), or the default cascade for the target's kind with
    its keeps scaled to k. An empty list is a FAISS-only answer (queries by example only)."""
    if stages is None and _ungraded(target):
        stages = ()  # no pair model to run: FAISS alone (`target_from_examples`)
    if stages is None:
        try:
            default = snapshot.config.stages_for(target.kind)
        except LookupError as exc:
            raise RequestError("target", str(exc)) from None
        stages = scale_keeps(default, k, snapshot.config.reference_k)
    stages = tuple(stages)
    if not stages and target.candidates is None:
        raise RequestError("stages", "an empty stage list (FAISS only) needs a query by example")
    if stages:
        check_stages(stages, snapshot.variants, k, target.kind)
    return stages
