"""Carrying evidence between cascade stages against starting over, on a rare-target space (not a test).

    .venv/bin/python -m benchmarks.bench_carry --home /tmp/bench-home --space rare-l7 \
        --seeds 0,1,2,3,4,5,6,7,8,9 --out var/bench/carry_rare-l7.json

Why: the engine's stages start over: stage i ranks the survivors by its own samples only. A cheap second stage
could instead add its one new sample to the first stage's posterior (product of experts, as `bayes` does within
a stage: log p1 + log p2 - log prior, renormalised), which is cheaper than two fresh samples. This runs both on
the same queries: after `FIRST` (one sample, keep 2,000), a second stage with one *carried* sample (a member
other than the one the first stage scored), the same stage with one fresh sample (starting over: the same cost
without carrying), and the documented best cascade of the rare label 7 (two fresh samples); each then
`cnn-s50` (4 samples, keep max(k, keep/4)) and the dense model on 5 samples. Every setting runs through the copy of the
engine's stage loop in `lab/carry.py`; it checks first that, without carrying, the loop returns exactly the
clusters of the engine (`cascade.plan.execute`).
Per seed (member sampling): the dense oracle, then every setting in a shuffled order, k = the rare label's
clusters; recall@k against them, wall ratio = median oracle ms / median setting ms (building the target
included), as `bench_cascade`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_HOME, dump_json, load_snapshot_from, median, parse_ints, set_threads
from lab.carry import CarrySetting, carry_method, check_against_engine, run_carrying

__all__ = ["main", "settings_for"]

FIRST = {"variant": "cnn-s10f", "samples": 1, "keep": 2000}


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


def measure(home: Path, space_name: str, seeds: tuple[int, ...], seconds: tuple[str, ...], keeps: tuple[int, ...]):
    from cascade.plan import target_from_label
    from cascade.ranking_metrics import recall_at_k, relevant_items
    from cascade.side_by_side import HeldOutQuery, side_by_side

    set_threads(1)
    snap = load_snapshot_from(home, space_name)
    space = snap.space
    label = int(space.meta["rare_label"])
    relevant = relevant_items(space.cluster_labels, label)
    k = len(relevant)  # every cluster of the rare label
    settings = settings_for(k, seconds, keeps)
    for st in settings:
        if not any(st.carry):
            check_against_engine(snap, label, k, st)
    print(f"{space.meta.get('id')}: label {label}, k={k}, {len(settings)} settings x {len(seeds)} seeds", flush=True)
    for st in settings:  # warm-up
        run_carrying(snap, target_from_label(snap, label), k, st, 0)
    query = HeldOutQuery(f"label {label}", lambda s: target_from_label(s, label), frozenset(relevant))
    methods = [carry_method(str(i), st) for i, st in enumerate(settings)]
    rounds = side_by_side(snap, [query], methods, k, seeds, shuffle=np.random.default_rng(12345))
    oracle_ms = [r["oracle"].ms for r in rounds]
    oracle = rounds[-1]["oracle"]
    rows: list[dict] = []
    for r in rounds:
        for i in range(len(settings)):
            got = r[str(i)]
            recall = recall_at_k(got.cluster_ids, relevant, k)
            rows.append(
                {"setting": i, "seed": r.seed, "ms": got.ms, "recall": recall, "flops": got.flops,
                 "stage_ms": list(got.stage_ms)}
            )  # fmt: skip
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
