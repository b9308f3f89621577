"""The cascade chooses itself: measure candidate plans of the pair cascade on dev queries and pick the cheapest
that meets a quality target (or the best within a FLOPs or latency budget).

A plan is stage 0's M and a stage list. Every plan is measured on the same dev queries (`cascade.queries`
`SPLIT_RULE`), in turn per query so that machine noise hits all of them alike:
- quality relative to the dense rerank of FAISS top M (the dense pair model on every member of the M nearest
  clusters, `mean_logit` as the oracle aggregates): `rel_ndcg`, the nDCG@10 of the plan's top 10 with the dense
  rerank's expected gains as relevance, and agreement@10 with its top 10;
- quality against the truth (recall@1 of the own cluster, graded nDCG@10 with the space's default gains);
- cost: FLOPs per query and measured milliseconds, stage 0 included.

The search is bounded: a coarse grid, then greedy refinement along the Pareto front (one knob at a time around
the plan the target currently selects), until a round adds nothing to the front or the plan or time budget is
spent. Two rules hold whatever the target: no chosen plan loses to FAISS alone on dev nDCG@10 (where the dense
rerank itself does not beat FAISS alone, FAISS alone is the plan, and the record says why), and none costs
more FLOPs than the dense model on every item (M and keeps are capped at the number of clusters).

No HTTP here: `prunecascade tune`, the bootstrap and the admin route call `tune`."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cascade.config import CONFIG_FILE, CascadeConfig, Stage
from cascade.costs import dense_flops
from cascade.engine import CascadeResult, dense_oracle
from cascade.plan import QueryPlan, execute, plan_target
from cascade.plan import target_from_examples as _target_from_examples
from cascade.queries import SPLIT_RULE, QuerySet, cluster_grades
from cascade.ranking_metrics import agreement_at_k, hit_at_k, ndcg_at_k, pareto_front, wilson_interval
from cascade.snapshot import Snapshot
from cascade.target import Target
from cascade.tuning_record import PlanPoint, TuneTarget, TuningRecord, dev_check

__all__ = [
    "Plan",
    "Measured",
    "TuneOptions",
    "TuneResult",
    "tune",
    "tuned_config",
    "select",
    "coarse_grid",
    "neighbours",
    "measure_split",
    "DEFAULT_TARGET",
    "REFERENCE_AGGREGATOR",
]

REFERENCE_AGGREGATOR = "mean_logit"  # the dense rerank aggregates all members as the oracle does
DEFAULT_TARGET = TuneTarget(kind="quality", value=0.99)
SAMPLE_LADDER = (1, 2, 3, 4, 6, 8, 10, 16, 32, 64)
RACE_QUERIES = 50  # a new plan is measured on this many dev queries first, and on the rest if it may make the front
RACE_MARGIN = 0.005  # dropped when a plan measured on every query is cheaper and this much better on those first
RETIME_QUERIES = 50  # the final front is timed again, side by side, on the first this many dev queries
GAINS_CHECK_QUERIES = 100  # the gains check reruns the dense rerank: on the first this many dev queries


@dataclass(frozen=True)
class Plan:
    """Stage 0's M and the stage list ([] = FAISS only)."""

    candidates: int
    stages: tuple[Stage, ...]

    @property
    def key(self) -> str:
        stages = [s.model_dump() for s in self.stages]
        return json.dumps([self.candidates if self.stages else 0, stages], sort_keys=True)

    @property
    def name(self) -> str:
        if not self.stages:
            return "FAISS only"
        parts = [
            f"{s.variant} n{s.samples}" + (f" keep{s.keep}" if i < len(self.stages) - 1 else "") + f" {s.aggregator}"
            for i, s in enumerate(self.stages)
        ]
        return f"M{self.candidates}: " + " -> ".join(parts)


@dataclass
class Measured:
    """A plan's per-query measurements on one query split."""

    plan: Plan
    rel_ndcg: np.ndarray
    agreement: np.ndarray
    hit1: np.ndarray
    ndcg: np.ndarray
    flops: np.ndarray
    ms: np.ndarray
    rel_ndcg_low: float = math.nan

    @property
    def mean_flops(self) -> float:
        return float(self.flops.mean())

    @property
    def median_ms(self) -> float:
        return float(np.median(self.ms))

    @property
    def mean_rel(self) -> float:
        return float(np.nanmean(self.rel_ndcg))

    @property
    def mean_ndcg(self) -> float:
        return float(np.nanmean(self.ndcg))

    def point(self) -> PlanPoint:
        return PlanPoint(
            name=self.plan.name,
            candidates=self.plan.candidates,
            stages=self.plan.stages,
            rel_ndcg=round(self.mean_rel, 5),
            rel_ndcg_low=round(self.rel_ndcg_low, 5),
            agreement=round(float(self.agreement.mean()), 5),
            recall_at_1=round(float(self.hit1.mean()), 5),
            ndcg=round(self.mean_ndcg, 5),
            flops=round(self.mean_flops),
            ms=round(self.median_ms, 3),
            queries=len(self.rel_ndcg),
        )


@dataclass(frozen=True)
class TuneOptions:
    target: TuneTarget = DEFAULT_TARGET
    candidates: int = 200
    """M of the dense rerank that quality is relative to, and the largest M a plan may have (capped at the
    number of clusters)."""
    k: int = 10
    dev_queries: int | None = None  # None: every dev query
    test: bool = True  # measure the chosen plan, FAISS alone and the dense rerank on the test queries
    max_plans: int = 60
    max_seconds: float = 150.0
    """Refinement measures only the plans that should fit in what is left of this, at the milliseconds per FLOP
    measured so far (the references and the coarse grid always run)."""
    round_plans: int = 8
    oracle_queries: int = 0  # the dense model on every item, on this many dev queries (slow on a big space)
    resamples: int = 1000
    seed: int = 0
    progress: bool | None = None  # None: a bar only when stderr is a terminal
    faiss_guard: bool = True
    """False: plans may lose to FAISS alone (to measure the search on a space whose reranker loses; `prunecascade
    tune --no-faiss-guard` then stores nothing)."""
    stop_when_faiss_wins: bool = False
    """Measure no other plan (nor the gains) once the dense rerank has lost to FAISS alone (the plan is FAISS
    alone anyway); False measures the grid all the same, for the picture of the front."""


@dataclass
class TuneResult:
    record: TuningRecord
    measured: list[Measured]
    chosen: Measured
    seconds: float

    def plan(self) -> Plan:
        return self.chosen.plan


# -- the one place that calls the engine ---------------------------------------------------------------------------


def _answer(snapshot: Snapshot, target: Target, k: int, plan: Plan, seed: int) -> CascadeResult:
    """A plan answered on a query target made for the reference's M: stage 0 keeps the first `plan.candidates`
    candidates (the nearest ones, in order), then the engine runs the stages."""
    if plan.candidates < len(target.candidates):  # type: ignore[arg-type]
        target = replace(
            target,
            candidates=target.candidates[: plan.candidates],  # type: ignore[index]
            candidate_distances=target.candidate_distances[: plan.candidates],  # type: ignore[index]
        )
    result = execute(_restricted_plan(snapshot, target, k, plan), seed)
    assert isinstance(result, CascadeResult)  # a query by example is never the exact table's
    return result


def _restricted_plan(snapshot: Snapshot, target: Target, k: int, plan: Plan) -> QueryPlan:
    """The engine's query plan for a tuner's plan (stages as given: [] is FAISS alone)."""
    return plan_target(snapshot, target, k, plan.stages)


# -- plans -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Space:
    """What bounds the plans: the variants by cost, the dense model, cluster counts and sizes."""

    variants: tuple[str, ...]  # pair variants, cheapest per pair first (the dense model last)
    dense: str
    max_candidates: int
    samples_all: int  # the largest cluster: every member
    k: int


def _plan_space(snapshot: Snapshot, options: TuneOptions) -> _Space:
    dense = snapshot.config.pair_dense
    if dense is None or snapshot.embedding is None or dense not in snapshot.variants:
        raise ValueError("this space has no pair models (queries by example): nothing to tune")
    pair = [v for v in snapshot.variants.values() if v.kind == "pair"]
    by_cost = sorted(pair, key=lambda v: (v.cost(100).nonzero, v.name))
    names = (*tuple(v.name for v in by_cost if v.name != dense), dense)
    clusters = snapshot.space.num_clusters
    m = min(options.candidates, clusters)
    if m < options.k:
        raise ValueError(f"the space has {clusters} clusters, fewer than k={options.k}")
    return _Space(names, dense, m, int(snapshot.space.sizes.max()), options.k)


def _ladder(space: _Space) -> list[int]:
    k, m = space.k, space.max_candidates
    values = {k * f for f in (2, 3, 4, 6, 8, 10, 15, 20)} | {m, max(k, m // 2), max(k, m // 4)}
    return sorted(v for v in values if k <= v <= m)


def _keeps(space: _Space, below: int) -> list[int]:
    k = space.k
    values = {k, math.ceil(1.5 * k), 2 * k, 3 * k, 4 * k, 6 * k, 8 * k, 10 * k, 15 * k, 20 * k}
    return sorted(v for v in values if k <= v < below)


def _samples(space: _Space) -> list[int]:
    return sorted({min(n, space.samples_all) for n in SAMPLE_LADDER})


def _last(space: _Space, samples: int | None = None, aggregator: str = REFERENCE_AGGREGATOR) -> Stage:
    return Stage(variant=space.dense, samples=samples or space.samples_all, aggregator=aggregator)


def reference_plan(space: _Space) -> Plan:
    """The dense rerank of FAISS top M: the dense model on every member of the M nearest clusters."""
    return Plan(space.max_candidates, (_last(space),))


def valid(plan: Plan, space: _Space) -> bool:
    """Last stage the dense model, keeps strictly falling below the clusters they receive, at least k."""
    if not plan.stages:
        return True
    if not space.k <= plan.candidates <= space.max_candidates or plan.stages[-1].variant != space.dense:
        return False
    alive = plan.candidates
    for stage in plan.stages[:-1]:
        if stage.keep is None or not space.k <= stage.keep < alive:
            return False
        alive = stage.keep
    return all(1 <= s.samples <= space.samples_all for s in plan.stages)


def coarse_grid(space: _Space) -> list[Plan]:
    """FAISS only, the dense rerank, two-stage plans (the cheapest variant on one member at a few keeps, each
    other cheaper variant at the smallest keep, then the dense model on every member) and a three-stage plan
    whose middle stage reads a few members with the dense model (the last one extends it). Everything else
    (other M, samples, aggregators, variants, keeps) is left to the refinement, one step at a time from the
    plans that make the front: the grid is where the time goes on a large space."""
    k, big = space.k, space.max_candidates
    plans = [Plan(big, ()), Plan(big, (_last(space),))]
    cheap = space.variants[:-1] or (space.dense,)
    for m in (big,):
        keeps = [v for v in (2 * k, 4 * k, 6 * k) if v < m]
        for j, variant in enumerate(cheap):
            for keep in keeps if j == 0 else keeps[:1]:
                plans.append(Plan(m, (Stage(variant=variant, samples=1, keep=keep), _last(space))))
        if keeps:
            first = Stage(variant=cheap[0], samples=1, keep=keeps[-1])
            middle_keep = keeps[0] if len(keeps) > 1 else None
            if middle_keep is not None:
                mid = Stage(variant=space.dense, samples=min(3, space.samples_all), keep=middle_keep)
                plans.append(Plan(m, (first, mid, _last(space))))
    return [p for p in _unique(plans) if valid(p, space)]


def _unique(plans: Iterable[Plan]) -> list[Plan]:
    seen: dict[str, Plan] = {}
    for p in plans:
        seen.setdefault(p.key, p)
    return list(seen.values())


def _step(values: list[int], current: int) -> list[int]:
    """The neighbours of `current` on a ladder of values (it need not be on it)."""
    lower = [v for v in values if v < current]
    higher = [v for v in values if v > current]
    return ([lower[-1]] if lower else []) + ([higher[0]] if higher else [])


def neighbours(plan: Plan, space: _Space) -> list[Plan]:
    """Every plan one knob away: M, a stage's samples, keep, aggregator or variant, one stage fewer, or a cheap
    first stage more."""
    if not plan.stages:
        return [reference_plan(space)]
    out: list[Plan] = []
    stages = list(plan.stages)
    for m in _step(_ladder(space), plan.candidates):
        out.append(Plan(m, plan.stages))
    alive = plan.candidates
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1

        def swap(new: Stage, i: int = i) -> Plan:
            return Plan(plan.candidates, (*stages[:i], new, *stages[i + 1 :]))

        for n in _step(_samples(space), stage.samples):
            out.append(swap(stage.model_copy(update={"samples": n})))
        if stage.samples > 1:  # on one member every aggregator ranks alike
            other = "bayes" if stage.aggregator != "bayes" else "mean_logit"
            out.append(swap(stage.model_copy(update={"aggregator": other})))
        if not last:
            assert stage.keep is not None
            for keep in _step(_keeps(space, alive), stage.keep):
                out.append(swap(stage.model_copy(update={"keep": keep})))
            j = space.variants.index(stage.variant) if stage.variant in space.variants else -1
            for jj in (j - 1, j + 1):
                if 0 <= jj < len(space.variants):
                    out.append(swap(stage.model_copy(update={"variant": space.variants[jj]})))
            out.append(Plan(plan.candidates, (*stages[:i], *stages[i + 1 :])))
            alive = stage.keep
    if len(stages) < 4:
        keep = next((v for v in reversed(_keeps(space, plan.candidates)) if v <= plan.candidates // 2), None)
        first_keep = stages[0].keep if len(stages) > 1 else plan.candidates
        cheapest_first = stages[0].variant == space.variants[0] and len(stages) > 1
        if keep is not None and first_keep is not None and keep > first_keep and not cheapest_first:
            out.append(Plan(plan.candidates, (Stage(variant=space.variants[0], samples=1, keep=keep), *stages)))
    return [p for p in _unique(out) if valid(p, space)]


# -- measuring ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Query:
    target: Target
    own: frozenset[int]  # the query's own cluster (the top grade)
    truth_gain: np.ndarray  # (clusters,) the gain of each cluster's true grade
    ref_gain: np.ndarray  # (clusters,) the dense rerank's expected gain of each of its M candidates, 0 elsewhere
    ref_top: np.ndarray  # the dense rerank's top k
    stage0_ms: float


def _rel_ndcg(ids: np.ndarray, q: _Query, k: int) -> float:
    """nDCG@k with the dense rerank's expected gains as relevance: its own top k is the ideal ranking."""
    return ndcg_at_k(ids, q.ref_gain, k)


def _truth(ids: np.ndarray, q: _Query, k: int) -> tuple[float, float]:
    """Recall@1 of the own cluster and graded nDCG@k against the truth."""
    return hit_at_k(ids, q.own, 1), ndcg_at_k(ids, q.truth_gain, k)


def _prepare(snapshot: Snapshot, qs: QuerySet, space: _Space, bar: tqdm) -> tuple[list[_Query], Measured]:
    """Per query: the target at the reference's M and the dense rerank of all M candidates (its gains are
    the relevance `rel_ndcg` is measured with). Returns the queries and the dense rerank's measurements."""
    queries, rows = [], []
    ref = reference_plan(space)
    clusters = snapshot.space.num_clusters
    for i in range(len(qs)):
        t0 = time.perf_counter()
        target = _target_from_examples(snapshot, qs.x[i : i + 1], space.max_candidates)
        stage0_ms = (time.perf_counter() - t0) * 1000.0
        t0 = time.perf_counter()
        result = _answer(snapshot, target, space.max_candidates, ref, seed=i)
        ms = (time.perf_counter() - t0) * 1000.0 + stage0_ms
        gain = np.zeros(clusters)
        gain[result.cluster_ids] = np.maximum(result.scores, 0.0)
        grades = cluster_grades(
            snapshot.space.cluster_labels, int(qs.cluster[i]), int(qs.label[i]), len(target.utility)
        )
        own = frozenset(np.flatnonzero(grades == grades.max()).tolist())
        q = _Query(target, own, target.utility[grades], gain, result.cluster_ids[: space.k], stage0_ms)
        queries.append(q)
        hit1, ndcg = _truth(result.cluster_ids, q, space.k)
        rows.append((_rel_ndcg(result.cluster_ids, q, space.k), 1.0, hit1, ndcg, result.flops + target.flops, ms))
        bar.update(1)
    return queries, _measured(ref, rows)


def _measured(plan: Plan, rows: list[tuple[float, ...]]) -> Measured:
    t = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    return Measured(plan, t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 4], t[:, 5])


def _measure(
    snapshot: Snapshot, queries: list[_Query], plans: list[Plan], k: int, bar: tqdm, start: int = 0
) -> list[Measured]:
    """Every plan on every query, in turn per query (noise hits all plans alike); query i (counted from `start`)
    samples members with seed i, whichever plan runs it."""
    rows: list[list[tuple[float, ...]]] = [[] for _ in plans]
    for i, q in enumerate(queries, start):
        for j, plan in enumerate(plans):
            t0 = time.perf_counter()
            result = _answer(snapshot, q.target, k, plan, seed=i)
            ms = (time.perf_counter() - t0) * 1000.0 + q.stage0_ms
            hit1, ndcg = _truth(result.cluster_ids, q, k)
            agree = agreement_at_k(result.cluster_ids, q.ref_top, k)
            rows[j].append((_rel_ndcg(result.cluster_ids, q, k), agree, hit1, ndcg, result.flops + q.target.flops, ms))
            bar.update(1)
    return [_measured(p, r) for p, r in zip(plans, rows, strict=True)]


def _race(
    snapshot: Snapshot, queries: list[_Query], plans: list[Plan], k: int, bar: tqdm, full: list[Measured]
) -> list[Measured]:
    """Measure `plans` on the first `RACE_QUERIES` dev queries, and on the rest only those that the plans already
    measured on every query do not dominate there (cheaper and better by `RACE_MARGIN` relative nDCG@10 on the
    same queries): a plan that cannot reach the front stops early. Returns every plan, the dropped ones measured
    on the first queries only."""
    head = RACE_QUERIES
    if len(queries) <= 2 * head:
        return _measure(snapshot, queries, plans, k, bar)
    first = _measure(snapshot, queries[:head], plans, k, bar)
    rivals = [(m.mean_flops, float(np.nanmean(m.rel_ndcg[:head]))) for m in full if len(m.rel_ndcg) == len(queries)]
    alive = [
        i
        for i, m in enumerate(first)
        if not any(f <= m.mean_flops and q >= m.mean_rel + RACE_MARGIN for f, q in rivals)
    ]
    bar.total -= (len(plans) - len(alive)) * (len(queries) - head)
    rest = _measure(snapshot, queries[head:], [plans[i] for i in alive], k, bar, start=head)
    for i, m in zip(alive, rest, strict=True):
        a = first[i]
        first[i] = Measured(
            a.plan,
            *(np.concatenate([getattr(a, f), getattr(m, f)]) for f in ("rel_ndcg", "agreement", "hit1", "ndcg")),
            np.concatenate([a.flops, m.flops]),
            np.concatenate([a.ms, m.ms]),
        )
    return first


def _lower_bounds(measured: list[Measured], confidence: float, resamples: int, seed: int) -> None:
    """One-sided percentile-bootstrap lower bound of each plan's mean rel_ndcg, over the same resamples of the
    queries for every plan."""
    indices: dict[int, np.ndarray] = {}
    for m in measured:
        if math.isnan(m.rel_ndcg_low):
            n = len(m.rel_ndcg)
            if n not in indices:  # the same resamples for every plan measured on as many queries
                indices[n] = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
            values = np.nan_to_num(m.rel_ndcg, nan=1.0)  # a query the dense rerank gives no gain: nothing to lose
            m.rel_ndcg_low = float(np.quantile(values[indices[n]].mean(axis=1), 1.0 - confidence))


def _oracle(snapshot: Snapshot, queries: list[_Query], count: int, k: int, bar: tqdm) -> dict[str, float]:
    flops = float(dense_flops(snapshot, queries[0].target)) if queries else math.nan
    out = {"flops": flops, "queries": float(min(count, len(queries)))}
    rows = []
    for q in queries[:count]:
        t0 = time.perf_counter()
        result = dense_oracle(snapshot, q.target, k)
        ms = (time.perf_counter() - t0) * 1000.0
        hit1, ndcg = _truth(result.cluster_ids, q, k)
        rows.append((_rel_ndcg(result.cluster_ids, q, k), hit1, ndcg, ms))
        bar.update(1)
    if rows:
        t = np.asarray(rows)
        out.update(
            rel_ndcg=float(np.nanmean(t[:, 0])),
            recall_at_1=float(t[:, 1].mean()),
            ndcg=float(t[:, 2].mean()),
            ms=float(np.median(t[:, 3])),
        )
    return out


def _gains_check(snapshot: Snapshot, queries: list[_Query], space: _Space, bar: tqdm) -> dict[str, object] | None:
    """Do the default gains serve the own cluster? Where a space's labels carry no relevance (a user's arbitrary
    grouping), the same-label grade's gain pulls other clusters of the label above the query's own: the dense
    rerank's recall@1 with gains [0, 1, 3] is then below its recall@1 with [0, 0, 1] (rank by p(own cluster))."""
    if not queries or len(queries[0].target.utility) != 3:
        return None
    ref = reference_plan(space)
    own = np.array([0.0, 0.0, 1.0])
    hits_default, hits_own = [], []
    for i, q in enumerate(queries[:GAINS_CHECK_QUERIES]):
        hits_default.append(hit_at_k(q.ref_top, q.own, 1))
        result = _answer(snapshot, replace(q.target, utility=own), space.k, ref, seed=i)
        hits_own.append(hit_at_k(result.cluster_ids, q.own, 1))
        bar.update(1)
    a, b = np.asarray(hits_default), np.asarray(hits_own)
    diff = b - a
    half = 1.959963984540054 * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else math.inf
    default = [float(g) for g in queries[0].target.utility]
    pulls = float(diff.mean()) - half > 0
    verdict = (
        f"the gains {default} pull the own cluster down: ranking by p(own cluster) finds it first in "
        f"{b.mean():.3f} of dev queries against {a.mean():.3f} (paired 95% interval of the difference "
        f"[{diff.mean() - half:.3f}, {diff.mean() + half:.3f}]): the labels seem to carry no relevance here; "
        "queries that want the own cluster should send gains [0, 0, 1]"
        if pulls
        else f"the gains {default} do not measurably pull the own cluster down (recall@1 {a.mean():.3f} against "
        f"{b.mean():.3f} with [0, 0, 1])"
    )
    return {
        "default_gains": default,
        "queries": len(a),
        "recall_at_1_default_gains": round(float(a.mean()), 4),
        "recall_at_1_gains_0_0_1": round(float(b.mean()), 4),
        "pulls_own_cluster_down": pulls,
        "verdict": verdict,
    }


# -- choosing --------------------------------------------------------------------------------------------------


def _eligible(measured: list[Measured], faiss: Measured, oracle_flops: float, guard: bool = True) -> list[Measured]:
    """Plans measured on every dev query that never lose to FAISS alone on dev nDCG@10 and cost no more than the
    dense model on every item (`guard` False drops the first rule: for measuring the search itself, never for a
    served plan). A plan the race dropped after its first queries is not eligible."""
    floor = faiss.mean_ndcg if guard else -math.inf
    n = len(faiss.rel_ndcg)
    return [
        m
        for m in measured
        if m is faiss
        or (len(m.rel_ndcg) == n and m.mean_ndcg >= floor and m.mean_flops <= oracle_flops and m.plan.stages)
    ]


def select(
    measured: list[Measured],
    target: TuneTarget,
    faiss: Measured,
    ref: Measured,
    oracle_flops: float,
    guard: bool = True,
) -> tuple[Measured, str, bool]:
    """The chosen plan, why, and whether the dense rerank beats FAISS alone on dev queries."""
    helps = ref.mean_ndcg > faiss.mean_ndcg
    if not helps and guard:
        return (
            faiss,
            f"FAISS alone: the dense rerank of FAISS top {ref.plan.candidates} does not beat it on "
            f"{len(ref.ndcg)} dev queries (nDCG@10 {ref.mean_ndcg:.3f} against {faiss.mean_ndcg:.3f}, recall@1 "
            f"{ref.hit1.mean():.3f} against {faiss.hit1.mean():.3f}), so no cascade over it can be worth its cost",
            False,
        )
    pool = _eligible(measured, faiss, oracle_flops, guard)
    if target.kind == "quality":
        meets = [m for m in pool if m.rel_ndcg_low >= target.value]
        if not meets:
            return faiss, f"FAISS alone: no plan that beats it reaches {target.describe()}", True
        best = min(meets, key=lambda m: (m.mean_flops, m.median_ms))
        why = (
            f"the fewest FLOPs among the {len(meets)} measured plans whose relative nDCG@10 lower bound reaches "
            f"{target.value:g} ({best.rel_ndcg_low:.4f})"
            + (" and that beat FAISS alone on dev nDCG@10" if guard else " (FAISS guard off: not to be served)")
        )
        return best, why, True
    cost = (lambda m: m.mean_flops) if target.kind == "flops" else (lambda m: m.median_ms)
    within = [m for m in pool if cost(m) <= target.value]
    if not within:
        return faiss, f"FAISS alone: no plan that beats it fits {target.describe()}", True
    best = max(within, key=lambda m: (m.mean_rel, -m.mean_flops))
    return best, f"the highest relative nDCG@10 among the {len(within)} measured plans within the budget", True


# -- the search ------------------------------------------------------------------------------------------------


def _bar(total: int, show: bool | None, what: str) -> tqdm:
    disable = not sys.stderr.isatty() if show is None else not show
    return tqdm(total=total, desc=what, disable=disable, unit="run", leave=False)


def _estimated(snapshot: Snapshot, target: Target, k: int, plan: Plan) -> float:
    """FLOPs of a plan before it runs (the engine's estimate: exact where every cluster has the sampled members),
    for the cap at the dense model's cost."""
    if plan.candidates < len(target.candidates):  # type: ignore[arg-type]
        target = replace(target, candidates=target.candidates[: plan.candidates])  # type: ignore[index]
    return float(_restricted_plan(snapshot, target, k, plan).flops)


def tune(snapshot: Snapshot, options: TuneOptions = TuneOptions(), say: Callable[[str], None] = print) -> TuneResult:
    """Measure plans on the dev queries and choose one for `options.target`; the chosen plan, FAISS alone and
    the dense rerank are then measured on the test queries (`options.test`)."""
    started = time.perf_counter()
    space = _plan_space(snapshot, options)
    if snapshot.queries is None or len(snapshot.queries) == 0:
        raise ValueError("the space has no held-out queries to tune on")
    dev = snapshot.queries.split("dev")
    if options.dev_queries is not None:
        dev = QuerySet(
            dev.x[: options.dev_queries], dev.cluster[: options.dev_queries], dev.label[: options.dev_queries]
        )
    if len(dev) < 2:
        raise ValueError(f"the space has {len(dev)} dev queries; tuning needs at least 2")
    k = space.k
    grid = coarse_grid(space)
    served = snapshot.config.pair_stages
    if served:  # the default being replaced is measured too: the tuned plan can only do better
        m = min(snapshot.config.pair_candidates or options.candidates, space.max_candidates)
        grid = _unique([*grid, *(p for p in [Plan(m, tuple(served))] if valid(p, space))])
    ref_plan = reference_plan(space)
    grid = [p for p in grid if p.key != ref_plan.key]
    total = len(dev) * (2 + len(grid)) + min(GAINS_CHECK_QUERIES + options.oracle_queries, len(dev))
    bar = _bar(total, options.progress, "tune")
    queries, ref = _prepare(snapshot, dev, space, bar)
    seconds_reference = time.perf_counter() - started
    oracle_flops = float(dense_flops(snapshot, queries[0].target))
    faiss = _measure(snapshot, queries, [Plan(space.max_candidates, ())], k, bar)[0]
    settled = ref.mean_ndcg <= faiss.mean_ndcg and options.stop_when_faiss_wins
    if settled:
        grid = []  # FAISS alone is the plan whatever the grid holds: measure nothing more
    grid = [p for p in grid if p.stages and _estimated(snapshot, queries[0].target, k, p) <= oracle_flops]
    bar.total = len(queries) * (2 + len(grid)) + (0 if settled else min(GAINS_CHECK_QUERIES, len(queries)))
    bar.total += min(options.oracle_queries, len(queries))
    bar.refresh()
    measured = [ref, faiss]
    measured += _race(snapshot, queries, grid, k, bar, measured)
    gains = None if settled else _gains_check(snapshot, queries, space, bar)
    oracle = _oracle(snapshot, queries, options.oracle_queries, k, bar)
    _lower_bounds(measured, options.target.confidence, options.resamples, options.seed)
    seconds_grid = time.perf_counter() - started - seconds_reference
    seen = {m.plan.key for m in measured}
    rounds = 0
    while len(measured) < options.max_plans and time.perf_counter() - started < options.max_seconds:
        chosen, _, helps = select(measured, options.target, faiss, ref, oracle_flops, options.faiss_guard)
        if not helps and options.faiss_guard:
            break
        front = _front(measured, faiss, oracle_flops, options.faiss_guard)
        fresh = _proposals(chosen, front, space, seen, options.round_plans)
        costs = {p.key: _estimated(snapshot, queries[0].target, k, p) for p in fresh}
        fresh = [p for p in fresh if costs[p.key] <= oracle_flops][: options.max_plans - len(measured)]
        # as many as the time left should measure, at the ms per FLOP the plans measured so far ran at
        left, rate = options.max_seconds - (time.perf_counter() - started), _ms_per_flop(measured)
        fitting = []
        for p in fresh:
            left -= len(queries) * (faiss.median_ms + costs[p.key] * rate) / 1000.0
            if left < 0:
                break
            fitting.append(p)
        fresh = fitting
        if not fresh:
            break
        seen.update(p.key for p in fresh)
        bar.total += len(fresh) * len(queries)
        bar.refresh()
        new = _race(snapshot, queries, fresh, k, bar, measured)
        _lower_bounds(new, options.target.confidence, options.resamples, options.seed)
        before = {m.plan.key for m in front}
        measured.extend(new)
        rounds += 1
        if {m.plan.key for m in _front(measured, faiss, oracle_flops, options.faiss_guard)} == before:
            break  # the round moved nothing on the front
    front = _front(measured, faiss, oracle_flops, options.faiss_guard)
    if not settled:
        _retime(snapshot, queries[:RETIME_QUERIES], [ref, *front], k, bar)
    bar.close()
    chosen, reason, helps = select(measured, options.target, faiss, ref, oracle_flops, options.faiss_guard)
    seconds = time.perf_counter() - started
    say(
        f"tuned on {len(queries)} dev queries: {len(measured)} plans measured ({len(grid) + 2} in the coarse grid, "
        f"{rounds} refinement rounds) in {seconds:.1f} s"
    )
    test = _test_report(snapshot, chosen, faiss, options) if options.test else None
    record = TuningRecord(
        target=options.target,
        chosen=chosen.point(),
        reason=reason,
        reranker_helps=helps,
        faiss_only=faiss.point(),
        dense_rerank=ref.point(),
        oracle={k_: round(v, 4) for k_, v in oracle.items()},
        front=tuple(m.point() for m in _front(measured, faiss, oracle_flops, options.faiss_guard)),
        gains_check=gains,
        test=test,
        dev_queries=len(queries),
        split_rule=SPLIT_RULE,
        models=_models(snapshot, [m.plan for m in measured]),
        space=str(snapshot.space.meta.get("id", "")),
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        tuner={
            "plans": float(len(measured)),
            "rounds": float(rounds),
            "seconds": round(seconds, 2),
            "seconds_reference": round(seconds_reference, 2),  # the dense rerank of every dev query
            "seconds_grid": round(seconds_grid, 2),  # FAISS alone, the grid, the gains check, the oracle
            "seconds_refinement": round(seconds - seconds_reference - seconds_grid, 2),  # and the final timing
            "candidates": float(space.max_candidates),
        },
    )
    return TuneResult(record, measured, chosen, seconds)


def _front(measured: list[Measured], faiss: Measured, oracle_flops: float, guard: bool = True) -> list[Measured]:
    pool = _eligible(measured, faiss, oracle_flops, guard)
    return [pool[i] for i in pareto_front([m.mean_flops for m in pool], [m.mean_rel for m in pool])]


def _retime(snapshot: Snapshot, queries: list[_Query], plans: list[Measured], k: int, bar: tqdm) -> None:
    """Time the front again, its plans in turn on each query: rounds ran minutes apart on a shared machine, so
    their milliseconds are not side by side; these are (the FLOPs and qualities do not change)."""
    rows: list[list[float]] = [[] for _ in plans]
    bar.total += len(plans) * len(queries)
    for i, q in enumerate(queries):
        for j, m in enumerate(plans):
            t0 = time.perf_counter()
            _answer(snapshot, q.target, k, m.plan, seed=i)
            rows[j].append((time.perf_counter() - t0) * 1000.0 + q.stage0_ms)
            bar.update(1)
    for m, r in zip(plans, rows, strict=True):
        if r:
            m.ms = np.asarray(r)


def _ms_per_flop(measured: list[Measured]) -> float:
    """The median ratio of measured milliseconds to FLOPs over the plans with stages (for a round's time)."""
    ratios = [m.median_ms / m.mean_flops for m in measured if m.plan.stages and m.mean_flops > 0]
    return float(np.median(ratios)) if ratios else 0.0


def _proposals(chosen: Measured, front: list[Measured], space: _Space, seen: set[str], count: int) -> list[Plan]:
    """Neighbours of the chosen plan first, then of the front points nearest to it (in front order)."""
    keys = [m.plan.key for m in front]
    at = keys.index(chosen.plan.key) if chosen.plan.key in keys else 0
    order = sorted(range(len(front)), key=lambda i: abs(i - at))
    out: list[Plan] = []
    for plan in [chosen.plan, *(front[i].plan for i in order)]:
        for n in neighbours(plan, space):
            if n.key not in seen and all(n.key != o.key for o in out):
                out.append(n)
            if len(out) >= count:
                return out
    return out


def measure_split(
    snapshot: Snapshot, plans: list[Plan], split: str, options: TuneOptions, bar: tqdm | None = None
) -> list[Measured]:
    """`plans` (the dense rerank of FAISS top M is measured first, as the reference) on a query split."""
    space = _plan_space(snapshot, options)
    assert snapshot.queries is not None
    qs = snapshot.queries.split(split)
    own = bar is None
    bar = bar if bar is not None else _bar(len(qs) * (1 + len(plans)), options.progress, split)
    queries, ref = _prepare(snapshot, qs, space, bar)
    out = [ref, *_measure(snapshot, queries, [p for p in plans if p.key != ref.plan.key], space.k, bar)]
    _lower_bounds(out, options.target.confidence, options.resamples, options.seed)
    if own:
        bar.close()
    return out


def _test_report(
    snapshot: Snapshot, chosen: Measured, faiss: Measured, options: TuneOptions
) -> dict[str, dict[str, float]] | None:
    """The chosen plan, FAISS alone and the dense rerank on the test queries; `meets_target` says whether the
    test mean is within the confidence interval of the target (its two-sided upper bound reaches it)."""
    assert snapshot.queries is not None
    if len(snapshot.queries.split("test")) < 2:
        return None
    plans = _unique([faiss.plan, chosen.plan])
    measured = measure_split(snapshot, plans, "test", options)
    by_key = {m.plan.key: m for m in measured}
    out = {}
    for name, m in (
        ("chosen", by_key[chosen.plan.key]),
        ("faiss_only", by_key[faiss.plan.key]),
        ("dense_rerank", measured[0]),
    ):
        out[name] = _summary(m, options)
    return out


def _summary(m: Measured, options: TuneOptions) -> dict[str, float]:
    n = len(m.rel_ndcg)
    idx = np.random.default_rng(options.seed + 1).integers(0, n, size=(options.resamples, n))
    means = np.nan_to_num(m.rel_ndcg, nan=1.0)[idx].mean(axis=1)
    alpha = (1.0 - options.target.confidence) / 2
    low, high = float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
    r1_low, r1_high = wilson_interval(round(float(np.nansum(m.hit1))), n)
    out = {
        "queries": float(n),
        "rel_ndcg": round(m.mean_rel, 4),
        "rel_ndcg_low": round(low, 4),
        "rel_ndcg_high": round(high, 4),
        "agreement": round(float(m.agreement.mean()), 4),
        "recall_at_1": round(float(m.hit1.mean()), 4),
        "recall_at_1_low": round(r1_low, 4),  # Wilson 95% interval
        "recall_at_1_high": round(r1_high, 4),
        "ndcg": round(m.mean_ndcg, 4),
        "flops": round(m.mean_flops),
        "ms": round(m.median_ms, 3),
    }
    if options.target.kind == "quality":
        out["meets_target"] = float(high >= options.target.value)
    return out


def _models(snapshot: Snapshot, plans: list[Plan]) -> dict[str, str]:
    names = {s.variant for p in plans for s in p.stages}
    return {
        n: f"{snapshot.variants[n].version}:{snapshot.variants[n].manifest.sha256[:12]}"
        for n in sorted(names)
        if n in snapshot.variants
    }


# -- storing ---------------------------------------------------------------------------------------------------


def tuned_config(config: CascadeConfig, result: TuneResult) -> CascadeConfig:
    """`config` with the chosen plan as its default pair cascade, its M, and the record of how it was chosen."""
    plan = result.plan()
    return config.model_copy(
        update={
            "pair_stages": plan.stages,
            "pair_candidates": plan.candidates if plan.stages else None,
            "pair_tuning": result.record,
        }
    )


def save_tuned(home: Path, config: CascadeConfig, result: TuneResult) -> CascadeConfig:
    new = tuned_config(config, result)
    new.save(home / CONFIG_FILE)
    return new


BOOTSTRAP_TUNE = TuneOptions(dev_queries=100, test=False, max_plans=30, max_seconds=45.0, stop_when_faiss_wins=True)
"""The bootstrap's tuning: bounded so that a first `make run` stays short (100 dev queries, at most 45 s before
refinement stops); `prunecascade tune` measures more."""

BOOTSTRAP_RECORD = "bootstrap.json"


def tune_home(
    home: Path, options: TuneOptions = BOOTSTRAP_TUNE, say: Callable[[str], None] = print
) -> TuneResult | None:
    """The bootstrap's last step: tune the home's default pair cascade on its dev queries, store it with its
    record in `cascade.json`, and add the dev-query check (FAISS alone, the dense rerank, the chosen default) to
    `bootstrap.json`. Nothing to do (None) without pair models or held-out queries, or when the default is
    tuned already (a second bootstrap is ready in seconds)."""
    from cascade.snapshot import load_snapshot
    from models.registry import ModelRegistry

    config = CascadeConfig.load(home / CONFIG_FILE)
    if config.pair_dense is None or config.pair_tuning is not None:
        return None
    snapshot = load_snapshot(ModelRegistry(home / "registry"), home / "spaces" / "default", config)
    if snapshot.queries is None or snapshot.embedding is None or len(snapshot.queries.split("dev")) < 2:
        return None
    result = tune(snapshot, options, say)
    save_tuned(home, config, result)
    path = home / BOOTSTRAP_RECORD
    if path.exists():
        record = json.loads(path.read_text())
        record["dev_check"] = dev_check(result.record)
        path.write_text(json.dumps(record, indent=2, default=str))
    return result
