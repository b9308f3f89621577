"""The cascade against the dense exhaustive oracle on >= 100,000 MNIST-1D items, in-process (not a test).

    .venv/bin/python -m benchmarks.bench_cascade prepare --home /tmp/bench-home         # models + spaces
    .venv/bin/python -m benchmarks.bench_cascade run --home /tmp/bench-home --regime rare \
        --firsts cnn-s10,cnn-s10f,cnn-s25,cnn-m10 --samples 1,2,4 --keeps 2,5,10,20 --depths 2,3 \
        --aggregators bayes,mean_prob --last-samples 5,10 --seeds 0,1,2,3,4,5 --out var/bench/cascade_rare.json
    .venv/bin/python -m benchmarks.bench_cascade run --home /tmp/bench-home --regime common \
        --firsts cnn-s10,cnn-s10f,cnn-s25 --samples 1,2 --keeps 2,5,20 --depths 2,3 \
        --aggregators bayes,mean_prob --seeds 0,1 --out var/bench/cascade_common.json
    .venv/bin/python -m benchmarks.bench_cascade report --results var/bench/cascade_rare.json \
        --figure docs/figures/performance_rare.png

Regimes: `common` queries every label with k=10 on the `big` space (every label owns ~1,160 clusters);
`rare` queries the rare label with k = R = its 20 clusters (0.2% of 10,000) on the `rare` space. Why ratios:
the machine is shared and noisy, so in every round the oracle and every cascade setting run back to back
(settings in a shuffled order), and wall-time ratios are medians of the oracle over medians of the cascade.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np

from benchmarks.common import (
    BIG_SPACE,
    DEFAULT_HOME,
    RARE_SPACE,
    dump_json,
    load_snapshot_from,
    median,
    parse_ints,
    prepare_home,
    set_threads,
)

__all__ = ["main", "Grid", "Setting", "run_regime"]


@dataclass(frozen=True)
class Setting:
    """One cascade configuration of the sweep: the stage list plus the knobs it was generated from."""

    name: str
    stages: tuple[dict, ...]
    first: str
    samples: int
    keep: int
    depth: int
    aggregator: str
    extra: bool = False  # from --cascades: listed in the tables, left out of the per-knob summary


def _setting(first: str, n1: int, keep1: int, depth: int, agg: str, last_n: int, k: int) -> Setting:
    stages: list[dict] = [{"variant": first, "samples": n1, "keep": keep1, "aggregator": agg}]
    if depth == 3:
        stages.append({"variant": "cnn-s50", "samples": 4, "keep": max(k, keep1 // 4), "aggregator": agg})
    stages.append({"variant": "dense", "samples": last_n, "aggregator": agg})
    name = f"{first}/n{n1}/keep{keep1}/{'3st' if depth == 3 else '2st'}/{agg}/dense-n{last_n}"
    return Setting(name, tuple(stages), first, n1, keep1, depth, agg)


@dataclass(frozen=True)
class Grid:
    """The sweep: first-stage variant x samples x keep (multiples of k) x stages (2: first -> dense, 3: first ->
    cnn-s50 (n=4, keep/4) -> dense) x aggregator (every stage) x dense samples, plus the service default."""

    firsts: tuple[str, ...] = ("cnn-s10", "cnn-s10f", "cnn-s25", "cnn-m10")
    samples: tuple[int, ...] = (1, 2, 4)
    keeps: tuple[int, ...] = (2, 5, 10, 20)
    depths: tuple[int, ...] = (2, 3)
    aggregators: tuple[str, ...] = ("bayes", "mean_prob")
    last_samples: tuple[int, ...] = (10,)
    cascades: tuple[tuple[str, tuple[dict, ...]], ...] = ()  # named stage lists outside the grid's shape

    def settings(self, k: int) -> list[Setting]:
        combos = product(self.firsts, self.samples, self.keeps, self.depths, self.aggregators, self.last_samples)
        out = [_setting(f, n, m * k, d, a, ln, k) for f, n, m, d, a, ln in combos]
        for name, stages in self.cascades:
            first = stages[0]
            agg = first.get("aggregator", "bayes")
            out.append(
                Setting(
                    name,
                    stages,
                    first["variant"],
                    first["samples"],
                    first.get("keep") or k,
                    len(stages),
                    agg,
                    extra=True,
                )
            )
        default = (
            {"variant": "cnn-s25", "samples": 2, "keep": 200, "aggregator": "bayes"},
            {"variant": "cnn-s50", "samples": 4, "keep": 40, "aggregator": "bayes"},
            {"variant": "dense", "samples": 10, "aggregator": "bayes"},
        )
        if k <= 40:
            out.append(
                Setting("default (cnn-s25/n2/200, cnn-s50/n4/40, dense)", default, "cnn-s25", 2, 200, 3, "bayes")
            )
        return out


def run_regime(
    home: Path,
    regime: str,
    sweep: Grid,
    seeds: tuple[int, ...],
    threads: int,
    space_name: str | None = None,
    warm: int = 0,
) -> dict:
    """Every (label, seed) is one round: the oracle once, then every setting once, in a shuffled order. With
    `warm` = W > 0, the oracle and every setting run W more times right after the first, on the same query and
    seed, and the last of those is timed too: the first time is "cold" (caches hold whatever ran before, as when
    queries of many kinds interleave), the last "warm" (as in a service answering a stream of queries with one
    cascade)."""
    from cascade.config import Stage
    from cascade.engine import dense_oracle
    from cascade.plan import execute, plan_target, target_from_label
    from cascade.ranking_metrics import agreement_at_k, recall_at_k, relevant_items
    from cascade.side_by_side import HeldOutQuery, side_by_side
    from cascade.side_by_side import stages as stages_method

    set_threads(threads)
    snap = load_snapshot_from(home, space_name or (RARE_SPACE if regime == "rare" else BIG_SPACE))
    space = snap.space
    if regime == "rare":
        labels = [int(space.meta["rare_label"])]
        k = int((space.cluster_labels == labels[0]).sum())
    else:
        labels, k = list(range(space.num_classes)), 10
    settings = sweep.settings(k)
    stage_lists = [tuple(Stage(**s) for s in st.stages) for st in settings]
    print(
        f"{regime}: {space.num_items:,} items, {space.num_clusters:,} clusters, k={k}, {len(settings)} settings, "
        f"{len(labels)} labels x {len(seeds)} seeds, torch threads {threads}",
        flush=True,
    )
    # warm-up: first calls allocate and pick kernels
    warmup = target_from_label(snap, labels[0])
    dense_oracle(snap, warmup, k)
    for stages in stage_lists:
        execute(plan_target(snap, warmup, k, stages), 0)

    queries = [
        HeldOutQuery(f"label {label}", lambda snap, label=label: target_from_label(snap, label),
                     frozenset(relevant_items(space.cluster_labels, label)), info={"label": label})
        for label in labels
    ]  # fmt: skip
    methods = [stages_method(str(i), stage_list) for i, stage_list in enumerate(stage_lists)]
    rounds = side_by_side(
        snap, queries, methods, k, seeds, shuffle=np.random.default_rng(12345), warm=warm,
        progress=lambda msg: print(f"  {msg}", flush=True),
    )  # fmt: skip
    rows: list[dict] = []
    oracle_rows: list[dict] = []
    for r in rounds:
        oracle, label = r["oracle"], r.query.info["label"]
        oracle_rows.append(
            {"seed": r.seed, "label": label, "ms": oracle.ms, "flops": oracle.flops,
             "recall": recall_at_k(oracle.cluster_ids, r.query.relevant, k)}
            | ({"ms_warm": oracle.ms_warm} if warm else {})
        )  # fmt: skip
        for i in range(len(settings)):
            got = r[str(i)]
            rows.append(
                {
                    "setting": i,
                    "seed": r.seed,
                    "label": label,
                    "ms": got.ms,
                    "recall": recall_at_k(got.cluster_ids, r.query.relevant, k),
                    "agreement": agreement_at_k(got.cluster_ids, oracle.cluster_ids, k),
                    "flops": got.flops,
                    "flops_dense_kernel": got.flops_dense_kernel,
                    "stage_ms": list(got.stage_ms),
                    "oracle_flops": oracle.flops,
                    "oracle_flops_dense_kernel": oracle.flops_dense_kernel,
                }
                | ({"ms_warm": got.ms_warm} if warm else {})
            )

    oracle_ms = median([r["ms"] for r in oracle_rows])
    oracle_ms_warm = median([r["ms_warm"] for r in oracle_rows]) if warm > 0 else None
    oracle_recall = float(np.mean([r["recall"] for r in oracle_rows]))
    summary = []
    for i, st in enumerate(settings):
        mine = [r for r in rows if r["setting"] == i]
        recall = float(np.mean([r["recall"] for r in mine]))
        ms = median([r["ms"] for r in mine])
        summary.append(
            {
                **asdict(st),
                "recall": recall,
                "recall_min": float(np.min([r["recall"] for r in mine])),
                "agreement": float(np.mean([r["agreement"] for r in mine])),
                "flops": float(np.mean([r["flops"] for r in mine])),
                "flops_ratio": float(np.mean([r["oracle_flops"] for r in mine]) / np.mean([r["flops"] for r in mine])),
                "flops_ratio_dense_kernel": float(
                    np.mean([r["oracle_flops_dense_kernel"] for r in mine])
                    / np.mean([r["flops_dense_kernel"] for r in mine])
                ),
                "ms": ms,
                "stage_ms": [median([r["stage_ms"][j] for r in mine]) for j in range(len(st.stages))],
                "time_ratio": oracle_ms / ms,
                "meets": recall >= 0.99 * oracle_recall,
            }
        )
        if oracle_ms_warm is not None:
            ms_warm = median([r["ms_warm"] for r in mine])
            summary[-1] |= {"ms_warm": ms_warm, "time_ratio_warm": oracle_ms_warm / ms_warm}
    return {
        "regime": regime,
        "space": space.meta.get("id", ""),
        "grid": asdict(sweep),
        "seeds": list(seeds),
        "labels": labels,
        "k": k,
        "threads": threads,
        "items": space.num_items,
        "clusters": space.num_clusters,
        "oracle": {
            "ms_median": oracle_ms,
            "ms_warm_median": oracle_ms_warm,
            "recall": oracle_recall,
            "flops": oracle_rows[0]["flops"],
        },
        "settings": summary,
        "rows": rows,
        "oracle_rows": oracle_rows,
    }


def _stage_ms(setting: dict) -> str:
    """Medians of each stage's own time (sampling, forward, aggregation, cut); older result files lack them."""
    return " / ".join(f"{v:.1f}" for v in setting.get("stage_ms", [])) or "-"


def _table(result: dict, top: int) -> str:
    """Markdown: the oracle, then the settings meeting recall, best wall-time ratio first, then the rest."""
    o = result["oracle"]
    warm = o.get("ms_warm_median") is not None
    lines = [
        f"{result['regime']} regime ({result.get('space') or 'space'}, labels {result['labels']}): "
        f"{result['items']:,} items, {result['clusters']:,} clusters, k={result['k']}, "
        f"seeds {result['seeds']}, torch threads {result['threads']}; oracle recall {o['recall']:.4f}, "
        f"oracle {o['flops'] / 1e9:.2f} GFLOP, median {o['ms_median']:.1f} ms"
        + (f" (warm: {o['ms_warm_median']:.1f} ms)" if warm else ""),
        "",
        "| setting | recall | agree | FLOPs ratio | FLOPs ratio (dense-kernel) | median ms | ms per stage | wall ratio "
        + ("| warm ms | wall ratio (warm) " if warm else "")
        + "| meets |",
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if warm else "") + "---|",
    ]
    ok = sorted((s for s in result["settings"] if s["meets"]), key=lambda s: -s["time_ratio"])
    bad = sorted((s for s in result["settings"] if not s["meets"]), key=lambda s: -s["recall"])
    defaults = [s for s in result["settings"] if s["name"].startswith("default")]
    shown = ok[:top] + [s for s in defaults if s not in ok[:top]] + bad[: max(0, top // 3)]
    for s in shown:
        lines.append(
            f"| {s['name']} | {s['recall']:.4f} | {s['agreement']:.3f} | {s['flops_ratio']:.0f}x | "
            f"{s['flops_ratio_dense_kernel']:.0f}x | {s['ms']:.2f} | {_stage_ms(s)} | {s['time_ratio']:.1f}x | "
            + (f"{s['ms_warm']:.2f} | {s['time_ratio_warm']:.1f}x | " if warm else "")
            + f"{'yes' if s['meets'] else 'no'} |"
        )
    lines += [
        "",
        "Per knob value (over all other knobs): settings meeting recall, mean recall, best ratios of those meeting:",
    ]
    lines += [
        "",
        "| knob | value | meet / all | mean recall | best FLOPs ratio | best wall ratio |",
        "|---|---|---|---|---|---|",
    ]
    knobs = {
        "first": lambda s: s["first"],
        "samples": lambda s: s["samples"],
        "keep": lambda s: s["keep"],
        "stages": lambda s: s["depth"],
        "aggregator": lambda s: s["aggregator"],
        "dense samples": lambda s: s["stages"][-1]["samples"],
    }
    swept = [s for s in result["settings"] if not s["name"].startswith("default") and not s.get("extra")]
    for knob, key in knobs.items():
        for value in sorted({key(s) for s in swept}, key=str):
            group = [s for s in swept if key(s) == value]
            good = [s for s in group if s["meets"]]
            best_f = f"{max(s['flops_ratio'] for s in good):.0f}x" if good else "-"
            best_t = f"{max(s['time_ratio'] for s in good):.1f}x" if good else "-"
            mean_recall = float(np.mean([s["recall"] for s in group]))
            lines.append(f"| {knob} | {value} | {len(good)} / {len(group)} | {mean_recall:.4f} | {best_f} | {best_t} |")
    lines.append("")
    lines.append(f"{len(ok)} of {len(result['settings'])} settings reach recall >= 0.99 x oracle's.")
    if ok:
        bf = max(ok, key=lambda s: s["flops_ratio"])
        bt = max(ok, key=lambda s: s["time_ratio"])
        lines.append(f"Best FLOPs ratio meeting recall: {bf['flops_ratio']:.0f}x ({bf['name']}).")
        lines.append(f"Best wall-time ratio meeting recall: {bt['time_ratio']:.1f}x ({bt['name']}).")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    """Recall against FLOPs ratio and against wall-time ratio; filled markers meet recall >= 0.99 x oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {
        "cnn-s10": "tab:blue",
        "cnn-s10f": "tab:purple",
        "cnn-s10g": "tab:red",
        "cnn-s25": "tab:orange",
        "cnn-m10": "tab:green",
    }
    markers = {("bayes", 2): "o", ("bayes", 3): "s", ("bayes", 4): "P", ("mean_prob", 2): "^", ("mean_prob", 3): "D"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    bar = 0.99 * result["oracle"]["recall"]
    for ax, key, label in zip(
        axes,
        ("flops_ratio", "time_ratio"),
        ("FLOPs ratio (oracle / cascade)", "wall-time ratio (oracle / cascade, in-process)"),
        strict=True,
    ):
        for s in result["settings"]:
            c = "black" if s["name"].startswith("default") else colors.get(s["first"], "gray")
            m = markers.get((s["aggregator"], s["depth"]), "x")
            ax.scatter(
                s[key], s["recall"], c=c if s["meets"] else "none", edgecolors=c, marker=m, s=20 + 8 * s["samples"]
            )
        front = sorted(((s[key], s["recall"]) for s in result["settings"]), key=lambda p: (-p[0], -p[1]))
        pareto, best = [], -1.0
        for x, y in front:  # settings no other beats in both ratio and recall
            if y > best:
                pareto.append((x, y))
                best = y
        ax.step(*zip(*pareto, strict=True), where="post", color="gray", lw=0.8, label="Pareto front")
        ax.axhline(bar, color="red", lw=0.8, ls="--", label="0.99 x oracle recall")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"recall@{result['k']}")
    firsts = {s["first"] for s in result["settings"]}
    shapes = {(s["aggregator"], s["depth"]) for s in result["settings"]}
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=n) for n, c in colors.items() if n in firsts]
    handles += [
        plt.Line2D([], [], color="gray", marker=m, ls="", label=f"{a}, {d} stages")
        for (a, d), m in markers.items()
        if (a, d) in shapes
    ]
    handles += [plt.Line2D([], [], color="black", marker="s", ls="", label="service default")]
    axes[1].legend(handles=handles, fontsize=7, loc="lower left")
    fig.suptitle(
        f"{result['regime']} targets: {result['items']:,} items, k={result['k']} "
        "(filled = meets 0.99 x oracle recall; marker size ~ first-stage samples)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="build the benchmark home: models, the big and the rare space")
    pr.add_argument("--home", type=Path, default=DEFAULT_HOME)
    pr.add_argument("--epochs", type=int, default=10, help="dense training epochs (bootstrap default: 40)")
    pr.add_argument("--big-samples", type=int, default=120_000, help="MNIST-1D items generated for the spaces")
    pr.add_argument("--big-seed", type=int, default=101)
    pr.add_argument("--rare-label", type=int, default=3)
    pr.add_argument("--rare-relevant", type=int, default=20)
    pr.add_argument("--rare-clusters", type=int, default=10_000)
    pr.add_argument("--rare-name", default=RARE_SPACE, help="directory of the rare space under HOME/spaces")
    pr.add_argument("--big-name", default=BIG_SPACE, help="directory of the common-target space under HOME/spaces")
    r = sub.add_parser("run", help="sweep cascade settings against the oracle, interleaved")
    r.add_argument("--home", type=Path, default=DEFAULT_HOME)
    r.add_argument("--regime", choices=["common", "rare"], default="rare")
    r.add_argument("--space", help="space under HOME/spaces (default: rare or big by regime)")
    r.add_argument(
        "--firsts", default="cnn-s10,cnn-s25", help="first-stage variants (full: %(default)s,cnn-s10f,cnn-m10)"
    )
    r.add_argument("--samples", default="1,2", help="first-stage samples per cluster (full: 1,2,4)")
    r.add_argument("--keeps", default="5,20", help="first-stage keep as multiples of k (full: 2,5,10,20)")
    r.add_argument("--depths", default="2", help="2: first -> dense; 3: first -> cnn-s50 -> dense (full: 2,3)")
    r.add_argument("--aggregators", default="bayes", help="applied to every stage (full: bayes,mean_prob)")
    r.add_argument("--last-samples", default="10", help="dense-stage samples per cluster")
    r.add_argument("--seeds", default="0,1,2", help="member-sampling seeds; every label is queried per seed")
    r.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the service default is 1)")
    r.add_argument(
        "--cascades",
        default="{}",
        help='extra named stage lists as JSON, e.g. \'{"4st": [{"variant": "cnn-s10f", "samples": 1, "keep": 2000}, '
        '..., {"variant": "dense", "samples": 5}]}\' (an empty --firsts runs only these)',
    )
    r.add_argument(
        "--warm",
        type=int,
        default=0,
        help="W: run the oracle and every setting W more times back to back and also report the last (warm) time",
    )
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--top", type=int, default=12, help="table rows")
    rep = sub.add_parser("report", help="markdown table and figure from a run's JSON")
    rep.add_argument("--results", type=Path, required=True)
    rep.add_argument("--figure", type=Path)
    rep.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare_home(
            args.home,
            epochs=args.epochs,
            big_samples=args.big_samples,
            big_seed=args.big_seed,
            rare_label=args.rare_label,
            rare_relevant=args.rare_relevant,
            rare_clusters=args.rare_clusters,
            rare_name=args.rare_name,
            big_name=args.big_name,
        )
        return 0
    if args.cmd == "run":
        try:
            cascades = json.loads(args.cascades)
            if not isinstance(cascades, dict) or not all(isinstance(v, list) and v for v in cascades.values()):
                raise ValueError("expected an object of name -> non-empty list of stages")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            p.error(f"--cascades: {e}")
        sweep = Grid(
            firsts=tuple(f for f in args.firsts.split(",") if f),
            samples=parse_ints(args.samples),
            keeps=parse_ints(args.keeps),
            depths=parse_ints(args.depths),
            aggregators=tuple(args.aggregators.split(",")),
            last_samples=parse_ints(args.last_samples),
            cascades=tuple((name, tuple(stages)) for name, stages in cascades.items()),
        )
        result = run_regime(
            args.home, args.regime, sweep, parse_ints(args.seeds), args.threads, args.space, warm=args.warm
        )
        dump_json(args.out, result)
        print(_table(result, args.top))
        return 0
    result = json.loads(args.results.read_text())
    print(_table(result, args.top))
    if args.figure:
        _plot(result, args.figure)
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
