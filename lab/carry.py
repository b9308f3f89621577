"""Carrying evidence between cascade stages: a copy of the engine's stage loop in which a stage may add its
posterior to the previous stage's (product of experts, as `bayes` does within a stage: log p1 + log p2 - log
prior, renormalised) instead of starting over. An experiment (`benchmarks/bench_carry.py` measures it against
starting over); `check_against_engine` makes sure that, without carrying, the loop answers as the engine does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

__all__ = ["CarrySetting", "CarryAnswer", "carry_method", "other_member", "run_carrying", "check_against_engine"]


@dataclass(frozen=True)
class CarrySetting:
    """A stage list (`cascade.config.Stage` fields) and, per stage, whether it adds to the previous posterior."""

    name: str
    stages: tuple[dict, ...]
    carry: tuple[bool, ...]


def other_member(offsets: np.ndarray, clusters: np.ndarray, previous: np.ndarray, rng: np.random.Generator):
    """One uniform member of each cluster other than `previous` (the row the last stage scored there); a cluster
    of one member gives that member again."""
    from cascade.space import sample_members

    two, counts = sample_members(offsets, clusters, 2, rng)  # 2 distinct members of every cluster of >= 2
    firsts = np.cumsum(counts) - counts
    pick = two[firsts]
    same = (pick == previous) & (counts >= 2)
    pick[same] = two[firsts[same] + 1]
    return pick


def run_carrying(snapshot, target, k: int, setting: CarrySetting, seed: int) -> tuple[np.ndarray, int, list[float]]:
    """The stage loop (`cascade.stage_loop.run_stages`) with an optional carry per stage: a carried stage
    samples one member per surviving cluster other than the one the previous (one-sample) stage scored, and
    ranks by the product of both stages' posteriors. Returns the k cluster ids, nonzero FLOPs, ms per stage."""
    import torch

    from cascade.config import Stage
    from cascade.costs import stage_flops
    from cascade.engine import stage_log_posterior
    from cascade.space import sample_members
    from cascade.target import ranking_key
    from models.aggregation import impossible_classes, log_softmax_rows

    space = snapshot.space
    rng = np.random.default_rng(seed)
    alive = np.arange(space.num_clusters)
    flops, stage_ms = 0, []
    prev_log_post = prev_rows = None
    stages = [Stage(**s) for s in setting.stages]
    for i, (stage, carry) in enumerate(zip(stages, setting.carry, strict=True)):
        started = time.perf_counter()
        variant = snapshot.variants[stage.variant]
        if carry:
            if stage.samples != 1 or prev_rows is None or len(prev_rows) != len(alive):
                raise ValueError(f"{setting.name}: a carried stage takes 1 sample after a 1-sample stage")
            rows, counts = other_member(space.offsets, alive, prev_rows, rng), np.ones(len(alive), dtype=np.int64)
        else:
            rows, counts = sample_members(space.offsets, alive, stage.samples, rng)
        with torch.inference_mode():
            x = torch.index_select(snapshot.features, 0, torch.from_numpy(rows))
            log_post = stage_log_posterior(variant, stage.aggregator, target.queries, x, torch.from_numpy(counts))
            if carry:
                prior = variant.log_prior.double()
                summed = prev_log_post + log_post - prior.masked_fill(impossible_classes(prior), 0.0)[None, :]
                log_post = log_softmax_rows(summed)
            n_keep = k if i == len(stages) - 1 else min(stage.keep or k, len(alive))
            top = torch.topk(ranking_key(log_post, target), n_keep).indices
        members = {int(n): int(c) for n, c in zip(*np.unique(counts, return_counts=True), strict=True)}
        flops += stage_flops(variant, stage.aggregator, len(rows), members, log_post.shape[1])[0]
        keep_idx = top.numpy()
        alive, prev_log_post = alive[keep_idx], log_post[top]
        prev_rows = rows[keep_idx] if stage.samples == 1 and len(rows) == len(counts) else None
        stage_ms.append((time.perf_counter() - started) * 1000.0)
    return alive, flops, stage_ms


def check_against_engine(snapshot, label: int, k: int, setting: CarrySetting) -> None:
    """Without carrying, this loop must return exactly the engine's clusters, or the comparison means nothing."""
    from cascade.config import Stage
    from cascade.plan import execute, plan_target, target_from_label

    mine, _, _ = run_carrying(snapshot, target_from_label(snapshot, label), k, setting, 0)
    stages = tuple(Stage(**s) for s in setting.stages)
    engine = execute(plan_target(snapshot, target_from_label(snapshot, label), k, stages), 0)
    if not np.array_equal(np.sort(mine), np.sort(engine.cluster_ids)):
        raise AssertionError(f"{setting.name}: this loop and the engine disagree without carrying")


@dataclass(frozen=True)
class CarryAnswer:
    """What `run_carrying` answers, as `cascade.side_by_side` reads an answer (nonzero FLOPs only)."""

    cluster_ids: np.ndarray
    flops: int
    stage_ms: tuple[float, ...]


def carry_method(name: str, setting: CarrySetting):
    """A setting as a side-by-side method: not a plan (the engine cannot carry), so it runs this loop."""
    from cascade.side_by_side import Method

    def run(snapshot, target, k: int, seed: int) -> CarryAnswer:
        ids, flops, stage_ms = run_carrying(snapshot, target, k, setting, seed)
        return CarryAnswer(ids, flops, tuple(stage_ms))

    return Method(name, run=run)
