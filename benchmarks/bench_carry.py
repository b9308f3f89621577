"""Carrying evidence between cascade stages against starting over, on a rare-target space (not a test).

    .venv/bin/python -m benchmarks.bench_carry --home /tmp/bench-home --space rare-l7 \
        --seeds 0,1,2,3,4,5,6,7,8,9 --out var/bench/carry_rare-l7.json

Why: the engine's stages start over: stage i ranks the survivors by its own samples only. A cheap second stage
could instead add its one new sample to the first stage's posterior (product of experts, as `bayes` does within
a stage: log p1 + log p2 - log prior, renormalised), which is cheaper than two fresh samples. This runs both on
the same queries: after `FIRST` (one sample, keep 2,000), a second stage with one *carried* sample (a member
other than the one the first stage scored), the same stage with one fresh sample (starting over: the same cost
without carrying), and the documented best cascade of the rare label 7 (two fresh samples); each then
`cnn-s50` (4 samples, keep max(k, keep/4)) and the dense model on 5 samples. Every setting runs through this
script's copy of the engine's stage loop; it checks first that, without carrying, the loop returns exactly the
clusters of `cascade.stage_loop.run_stages`.
Per seed (member sampling): the dense oracle, then every setting in a shuffled order, k = the rare label's
clusters; recall@k against them, wall ratio = median oracle ms / median setting ms (building the target
included), as `bench_cascade`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_HOME, dump_json, load_snapshot_from, median, parse_ints, set_threads

__all__ = ["main", "CarrySetting", "other_member", "run_carrying", "settings_for"]

FIRST = {"variant": "cnn-s10f", "samples": 1, "keep": 2000}


@dataclass(frozen=True)
class CarrySetting:
    """A stage list (`cascade.config.Stage` fields) and, per stage, whether it adds to the previous posterior."""

    name: str
    stages: tuple[dict, ...]
    carry: tuple[bool, ...]


def settings_for(k: int, seconds: tuple[str, ...], keeps: tuple[int, ...]) -> list[CarrySetting]:
    """Per (second-stage variant, keep): carried one sample, fresh one sample; plus the two-fresh-samples best."""
    out: list[CarrySetting] = []
    for variant in seconds:
        for keep in keeps:
            tail = ({"variant": "cnn-s50", "samples": 4, "keep": max(k, keep // 4)}, {"variant": "dense", "samples": 5})
            for carry in (True, False):
                second = {"variant": variant, "samples": 1, "keep": keep}
                tag = "carried" if carry else "fresh"
                name = f"cnn-s10f/n1/keep2000 > {variant}/n1 {tag}/{keep} > cnn-s50/n4/{max(k, keep // 4)} > dense-n5"
                out.append(CarrySetting(name, (FIRST, second, *tail), (False, carry, False, False)))
    best = (
        FIRST,
        {"variant": "cnn-s25", "samples": 2, "keep": 100},
        {"variant": "cnn-s50", "samples": 4, "keep": 25},
        {"variant": "dense", "samples": 5},
    )
    out.append(CarrySetting("cnn-s10f/n1/keep2000 > cnn-s25/n2/100 > cnn-s50/n4/25 > dense-n5", best, (False,) * 4))
    return out


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
    from cascade.engine import _stage_log_posterior, ranking_key, stage_flops
    from cascade.space import sample_members
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
            log_post = _stage_log_posterior(variant, stage.aggregator, target.queries, x, torch.from_numpy(counts))
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


def _check_against_engine(snapshot, label: int, k: int, setting: CarrySetting) -> None:
    """Without carrying, this loop must return exactly the engine's clusters, or the comparison means nothing."""
    from cascade.config import Stage
    from cascade.plan import execute, plan_target, target_from_label

    mine, _, _ = run_carrying(snapshot, target_from_label(snapshot, label), k, setting, 0)
    stages = tuple(Stage(**s) for s in setting.stages)
    engine = execute(plan_target(snapshot, target_from_label(snapshot, label), k, stages), 0)
    if not np.array_equal(np.sort(mine), np.sort(engine.cluster_ids)):
        raise AssertionError(f"{setting.name}: this loop and the engine disagree without carrying")


def measure(home: Path, space_name: str, seeds: tuple[int, ...], seconds: tuple[str, ...], keeps: tuple[int, ...]):
    from cascade.engine import dense_oracle
    from cascade.evaluation import recall_at_k
    from cascade.plan import target_from_label

    set_threads(1)
    snap = load_snapshot_from(home, space_name)
    space = snap.space
    label = int(space.meta["rare_label"])
    k = int((space.cluster_labels == label).sum())
    settings = settings_for(k, seconds, keeps)
    for st in settings:
        if not any(st.carry):
            _check_against_engine(snap, label, k, st)
    print(f"{space.meta.get('id')}: label {label}, k={k}, {len(settings)} settings x {len(seeds)} seeds", flush=True)
    for st in settings:  # warm-up
        run_carrying(snap, target_from_label(snap, label), k, st, 0)
    rows: list[dict] = []
    oracle_ms: list[float] = []
    order = np.random.default_rng(12345)
    for seed in seeds:
        t0 = time.perf_counter()
        oracle = dense_oracle(snap, target_from_label(snap, label), k)
        oracle_ms.append((time.perf_counter() - t0) * 1000)
        for i in order.permutation(len(settings)):
            t0 = time.perf_counter()
            ids, flops, stage_ms = run_carrying(snap, target_from_label(snap, label), k, settings[i], seed)
            ms = (time.perf_counter() - t0) * 1000
            recall = recall_at_k(space.cluster_labels[ids], label, k, k)
            row = {"setting": int(i), "seed": seed, "ms": ms, "recall": recall, "flops": flops, "stage_ms": stage_ms}
            rows.append(row)
    o_ms = median(oracle_ms)
    summary = []
    print(f"oracle median {o_ms:.1f} ms, {oracle.flops / 1e9:.2f} GFLOP; medians over seeds {list(seeds)}")
    print("| setting | recall | min recall | FLOPs ratio | median ms | ms per stage | wall ratio |")
    print("|---|---|---|---|---|---|---|")
    for i, st in enumerate(settings):
        mine = [r for r in rows if r["setting"] == i]
        s = {
            "name": st.name,
            "stages": st.stages,
            "carry": st.carry,
            "recall": float(np.mean([r["recall"] for r in mine])),
            "recall_min": float(np.min([r["recall"] for r in mine])),
            "flops_ratio": oracle.flops / float(np.mean([r["flops"] for r in mine])),
            "ms": median([r["ms"] for r in mine]),
            "stage_ms": [median([r["stage_ms"][j] for r in mine]) for j in range(len(st.stages))],
        }
        s["time_ratio"] = o_ms / s["ms"]
        summary.append(s)
        per_stage = " / ".join(f"{v:.1f}" for v in s["stage_ms"])
        print(
            f"| {st.name} | {s['recall']:.4f} | {s['recall_min']:.3f} | {s['flops_ratio']:.0f}x | {s['ms']:.2f} | "
            f"{per_stage} | {s['time_ratio']:.1f}x |"
        )
    return {
        "space": space.meta.get("id"),
        "label": label,
        "k": k,
        "seeds": list(seeds),
        "oracle": {"ms_median": o_ms, "flops": oracle.flops},
        "settings": summary,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=DEFAULT_HOME)
    p.add_argument("--space", default="rare-l7", help="a rare space under HOME/spaces (its meta names the label)")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--seconds", default="cnn-s10g,cnn-s25", help="second-stage variants")
    p.add_argument("--keeps", default="100,200", help="second-stage keeps")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    seconds = tuple(s for s in args.seconds.split(",") if s)
    out = measure(args.home, args.space, parse_ints(args.seeds), seconds, parse_ints(args.keeps))
    if args.out:
        dump_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
