"""Methods side by side on held-out queries: the one loop behind `prunecascade evaluate` and the benchmarks that
compare ways of answering (cascades, the exact table, FAISS only, the dense oracle, an experiment's own loop).

A method is given as a query plan: `Method.plan(snapshot, target, k)` returns the `QueryPlan` it would run
(`stages(...)`, `exact(...)` build the usual ones), and the harness carries it out with `cascade.plan.execute`,
as the service does. A method that is not a plan (the dense oracle, an experiment's copy of the stage loop)
gives `run` instead. Every (seed, query) is one round: the reference (the oracle, when given) once, then every
method once, in a shuffled order when asked, so machine noise hits all of them alike; each round keeps what
every method answered, what it cost and how long it took. What to measure on the answers is the caller's
(`cascade.ranking_metrics`), so each benchmark keeps its own table and this keeps only the protocol."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cascade.config import Stage
from cascade.engine import dense_oracle
from cascade.exact import ExactTable
from cascade.plan import QueryPlan, execute, plan_target
from cascade.snapshot import Snapshot
from cascade.target import Target

__all__ = [
    "Answered",
    "Method",
    "stages",
    "exact",
    "ORACLE",
    "HeldOutQuery",
    "Record",
    "Round",
    "side_by_side",
    "records_of",
]


class Answered(Protocol):
    """What every method's answer offers: the clusters, best first, and their cost (an `engine.CascadeResult`,
    an `exact.ExactAnswer`, or an experiment's own record). `flops_dense_kernel` and per-stage times (`stages`
    with `.ms`, or `stage_ms`) are read when the answer has them."""

    @property
    def cluster_ids(self) -> np.ndarray: ...

    @property
    def flops(self) -> int: ...


@dataclass(frozen=True)
class Method:
    """One way of answering. `plan(snapshot, target, k)` is its query plan, executed with the round's seed;
    `run(snapshot, target, k, seed)` answers directly when the method is not a plan. `embeds`: whether it
    uses a query by example's stage 0 (the embedding and the candidates it proposes): its time and FLOPs count
    towards the method's (every method but the dense oracle, which scores every cluster)."""

    name: str
    plan: Callable[[Snapshot, Target, int], QueryPlan] | None = None
    run: Callable[[Snapshot, Target, int, int], Answered] | None = None
    embeds: bool = True

    def __post_init__(self) -> None:
        if (self.plan is None) == (self.run is None):
            raise ValueError(f"method {self.name!r}: give exactly one of plan and run")

    def answer(self, snapshot: Snapshot, target: Target, k: int, seed: int) -> Answered:
        if self.plan is not None:
            return execute(self.plan(snapshot, target, k), seed)
        assert self.run is not None
        return self.run(snapshot, target, k, seed)


def stages(name: str, stage_list: Sequence[Stage] | None) -> Method:
    """The cascade of `stage_list` (None: the snapshot's default for the target, keeps scaled to k; []: FAISS
    only), planned as the service plans it."""
    chosen = None if stage_list is None else tuple(stage_list)
    return Method(name, plan=lambda snapshot, target, k: plan_target(snapshot, target, k, chosen))


def exact(name: str, table: ExactTable) -> Method:
    """The exact table's lookup (classifier targets)."""
    return Method(name, plan=lambda snapshot, target, k: plan_target(snapshot, target, k, table=table))


ORACLE = Method("oracle", run=lambda snapshot, target, k, seed: dense_oracle(snapshot, target, k), embeds=False)
"""The dense exhaustive oracle: the dense model on every member of every cluster, the yardstick of agreement."""


@dataclass(frozen=True)
class HeldOutQuery:
    """A query whose answer is known. `target(snapshot)` builds it (timed with every method: building the target
    is part of answering); `relevant`: the clusters that answer it, `gains`: each cluster's gain (graded
    relevance), for the caller's metrics; `info`: anything else the caller wants back with the round."""

    name: str
    target: Callable[[Snapshot], Target]
    relevant: frozenset[int] = frozenset()
    gains: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """One method's answer in one round: `ms` includes building the target (and stage 0 for a method that
    embeds); `flops` likewise includes the target's own FLOPs for a method that embeds; `ms_warm` is the last of
    `warm` repeats right after, when asked."""

    method: str
    answer: Answered
    cluster_ids: np.ndarray
    flops: int
    flops_dense_kernel: int | None  # None when the answer does not count it
    ms: float
    stage_ms: tuple[float, ...]
    ms_warm: float | None = None


@dataclass(frozen=True)
class Round:
    query: HeldOutQuery
    seed: int
    target: Target
    records: dict[str, Record]  # by method name, the reference's included

    def __getitem__(self, method: str) -> Record:
        return self.records[method]


def _record(method: Method, snapshot: Snapshot, query: HeldOutQuery, target: Target, target_ms: float,
            k: int, seed: int, warm: int) -> Record:  # fmt: skip
    shared = method.embeds or target.candidates is None  # the oracle of a query by example skips stage 0
    t0 = time.perf_counter()
    answer = method.answer(snapshot, target, k, seed)
    ms = (time.perf_counter() - t0) * 1000 + (target_ms if shared else 0.0)
    ms_warm = None
    for _ in range(warm):
        t0 = time.perf_counter()
        method.answer(snapshot, query.target(snapshot) if shared else target, k, seed)
        ms_warm = (time.perf_counter() - t0) * 1000
    own_ms = getattr(answer, "stage_ms", None)
    stage_ms = tuple(own_ms) if own_ms is not None else tuple(float(s.ms) for s in getattr(answer, "stages", ()))
    extra = target.flops if shared else 0
    dense_kernel = getattr(answer, "flops_dense_kernel", None)
    return Record(
        method.name,
        answer,
        np.asarray(answer.cluster_ids),
        int(answer.flops) + extra,
        None if dense_kernel is None else int(dense_kernel) + extra,
        ms,
        stage_ms,
        ms_warm,
    )


def side_by_side(
    snapshot: Snapshot,
    queries: Sequence[HeldOutQuery],
    methods: Sequence[Method],
    k: int,
    seeds: Sequence[int] = (0,),
    *,
    reference: Method | None = ORACLE,
    shuffle: np.random.Generator | None = None,
    warm: int = 0,
    seed_per_query: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Round]:
    """Every (seed, query) is one round: the target built once and timed, then `reference` (when given) and every
    method in turn, each answering the same target with the round's seed (plus the query's index with
    `seed_per_query`), in an order drawn from `shuffle` when given. `warm` > 0 repeats each method that many
    times right after its first answer and times the last repeat too (`Record.ms_warm`)."""
    names = [m.name for m in methods] + ([reference.name] if reference is not None else [])
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be distinct: {names}")
    rounds: list[Round] = []
    started = time.perf_counter()
    for seed in seeds:
        for i, query in enumerate(queries):
            round_seed = seed + i if seed_per_query else seed
            t0 = time.perf_counter()
            target = query.target(snapshot)
            target_ms = (time.perf_counter() - t0) * 1000
            records: dict[str, Record] = {}
            if reference is not None:
                records[reference.name] = _record(reference, snapshot, query, target, target_ms, k, round_seed, warm)
            order = range(len(methods)) if shuffle is None else shuffle.permutation(len(methods))
            for j in order:
                m = methods[int(j)]
                records[m.name] = _record(m, snapshot, query, target, target_ms, k, round_seed, warm)
            rounds.append(Round(query, round_seed, target, records))
        if progress is not None:
            progress(f"seed {seed} done ({time.perf_counter() - started:.0f}s)")
    return rounds


def records_of(rounds: Sequence[Round], method: str) -> list[Record]:
    """One method's records, in round order."""
    return [r.records[method] for r in rounds]
