"""`python -m lab.run_tuples --home HOME --dense dense`: the shared-label n-tuple experiment (`lab.tuples`).

For the dense model and its compression levels, every aggregator and n: n-accuracy, RI and FLOPs per tuple;
then, for fixed FLOPs budgets per tuple, the best compression level and n (the sweet spot). Writes JSON, CSV,
a Markdown summary and PNG plots to `--out`.

An experiment, not a product command: it lives in `lab/` beside `benchmarks/` and runs from a checkout of the
repository, so the installed `prunecascade` (and anything the server imports) carries none of it."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.commands.common import add_home, registry_from, settings_from, splits_for

if TYPE_CHECKING:
    import torch

    from lab.tuples import ExperimentNetwork, ExperimentResult, ResultRow
    from models.networks import Classifier
    from models.registry import ModelRegistry

__all__ = [
    "register",
    "run",
    "main",
    "write_outputs",
    "sweet_spot_figure",
    "sparse_log_ticks",
    "AGGREGATORS",
    "SWEET_SPOT_PNG",
]

# lab.tuples.DEFAULT_AGGREGATORS, spelled out so that the parser does not import torch (a test checks they agree)
AGGREGATORS = ("mean_prob", "mean_logit", "bayes", "lstm", "deepsets")
SWEET_SPOT_PNG = "aggregation_sweet_spot.png"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tuples", help="n-tuple aggregation experiment: n-accuracy, RI, FLOPs, sweet spot")
    add_home(p)
    p.add_argument("--dense", default="dense", help="NAME or NAME:VERSION of the dense model")
    p.add_argument(
        "--source",
        choices=["registry", "prune", "both"],
        default="registry",
        help="registry: the dense model's registered children; prune: prune it here (nothing is registered)",
    )
    p.add_argument("--methods", default="magnitude,layer-weight-norm", help="pruning methods for --source prune")
    p.add_argument("--keeps", default="0.5,0.25,0.1,0.05", help="compression levels (fractions kept) to prune")
    p.add_argument("--ns", default="1,2,4,8,16", help="tuple sizes")
    p.add_argument("--aggregators", default=",".join(AGGREGATORS))
    p.add_argument("--budgets", default="0.5,1,2,4,8", help="FLOPs budgets per tuple, in dense-network passes")
    p.add_argument("--tuples", type=int, default=2000, help="test tuples per (n, aggregator, variant)")
    p.add_argument("--n-cap", type=int, default=32, help="largest n considered for a budget")
    p.add_argument("--gadget-steps", type=int, default=1500)
    p.add_argument("--gadget-hidden", type=int, default=32, help="LSTM state / deepsets head width")
    p.add_argument("--gadget-n-max", type=int, default=32, help="n is drawn from 1..this during gadget training")
    p.add_argument("--save-gadgets", action="store_true", help="store trained lstm gadgets beside registry variants")
    p.add_argument("--use-stored-gadgets", action="store_true", help="reuse gadgets already in the registry")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory (default: HOME/reports/tuples)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _variant(
    label: str, method: str, keep: float, model: Classifier, gadget: torch.nn.Module | None = None
) -> ExperimentNetwork:
    from lab.tuples import ExperimentNetwork
    from models.flops import count_flops
    from models.gadget import Gadget

    f = count_flops(model, model.spec.input_dim)
    v = ExperimentNetwork(label, method, keep, model, f.nonzero, f.dense_kernel)
    if isinstance(gadget, Gadget):
        v.gadgets[gadget.spec.kind] = gadget
    return v


def _registry_variants(
    registry: ModelRegistry, dense_name: str, dense_version: int | None, use_stored: bool
) -> tuple[list[ExperimentNetwork], list[tuple[str, int]]]:
    dense = registry.load(dense_name, dense_version)
    refs = [(dense.manifest.name, dense.manifest.version)]
    variants = [_variant(dense.manifest.ref, "dense", 1.0, dense.model, dense.gadget if use_stored else None)]
    for m in registry.active_manifests():
        if m.parent == dense.manifest.ref:
            loaded = registry.load(m.name, m.version)
            variants.append(_variant(m.ref, m.method, m.keep, loaded.model, loaded.gadget if use_stored else None))
            refs.append((m.name, m.version))
    return variants, refs


def run(args: argparse.Namespace) -> int:
    import torch

    from lab.tuples import run_experiment
    from models.aggregation import list_aggregators
    from models.gadget_training import GadgetTrainConfig
    from models.pruning import get_method, prune
    from models.pruning.pipeline import calibration_from

    torch.set_num_threads(settings_from(args).torch_threads)
    registry = registry_from(args)
    name, _, version = args.dense.partition(":")
    manifest = registry.manifest(name, int(version) if version else None)
    splits = splits_for(manifest.dataset, args, **manifest.extra.get("data_args", {}))
    aggregators = [a for a in args.aggregators.split(",") if a]
    unknown = set(aggregators) - set(list_aggregators())
    if unknown:
        raise ValueError(f"unknown aggregators {sorted(unknown)}; known: {', '.join(list_aggregators())}")

    variants, refs = _registry_variants(registry, manifest.name, manifest.version, args.use_stored_gadgets)
    if args.source == "prune":
        variants, refs = variants[:1], refs[:1]
    if args.source in ("prune", "both"):
        dense_model = variants[0].model
        for method in [m for m in args.methods.split(",") if m]:
            spec = get_method(method)
            calibration = calibration_from(splits, 512, args.seed) if spec.needs_data else None
            for keep in _floats(args.keeps):
                torch.manual_seed(args.seed)
                pruned = prune(dense_model, method, keep, calibration)
                variants.append(_variant(f"{method}@{keep:g}", method, keep, pruned))
    if len(variants) == 1:
        print("note: only the dense model; use --source prune to create compression levels", file=sys.stderr)

    dense_flops = variants[0].flops
    budgets = [round(b * dense_flops) for b in _floats(args.budgets)]
    config = GadgetTrainConfig(n_max=args.gadget_n_max, steps=args.gadget_steps, seed=args.seed)
    result = run_experiment(
        splits,
        variants,
        ns=[int(n) for n in args.ns.split(",")],
        aggregators=aggregators,
        budgets=budgets,
        num_tuples=args.tuples,
        n_cap=args.n_cap,
        gadget_hidden=args.gadget_hidden,
        gadget_config=config,
        seed=args.seed,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    result.config.update(
        dense=manifest.ref, source=args.source, budgets_in_dense_passes=_floats(args.budgets), argv=sys.argv[1:]
    )
    if args.save_gadgets:
        for (ref_name, ref_version), v in zip(refs, variants, strict=False):
            if "lstm" in v.gadgets:
                registry.save_gadget(ref_name, ref_version, v.gadgets["lstm"], extra={"trained_by": "tuples"})
                print(f"stored the lstm gadget beside {ref_name}:{ref_version}")
    out = Path(args.out) if args.out else settings_from(args).home / "reports" / "tuples"
    write_outputs(result, out, plots=not args.no_plots)
    print((out / "summary.md").read_text())
    print(f"wrote {out}")
    return 0


def _write_csv(path: Path, rows: list[Any], cls: type) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(cls)])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def _summary(result: ExperimentResult) -> str:
    lines = ["## n-accuracy [95% CI] and RI per variant, aggregator and n", ""]
    lines.append("| variant | acc (n=1 net) | FLOPs/item | aggregator | n | FLOPs/tuple | n-accuracy | RI |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in result.rows:
        lines.append(
            f"| {r.variant} | {r.accuracy:.4f} | {r.flops_item:,} | {r.aggregator} | {r.n} | {r.flops_tuple:,} | "
            f"{r.n_accuracy:.4f} [{r.n_accuracy_low:.4f}, {r.n_accuracy_high:.4f}] | "
            f"{r.ri:.3f} [{r.ri_low:.3f}, {r.ri_high:.3f}] |"
        )
    lines += ["", "## Sweet spot: best variant and n per FLOPs budget per tuple", ""]
    lines.append("| budget (FLOPs/tuple) | aggregator | best variant | n | FLOPs/tuple | n-accuracy | RI | n capped |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in result.sweet_spots:
        lines.append(
            f"| {s.budget:,} | {s.aggregator} | {s.variant} | {s.n} | {s.flops_tuple:,} | "
            f"{s.n_accuracy:.4f} [{s.n_accuracy_low:.4f}, {s.n_accuracy_high:.4f}] | {s.ri:.3f} | {s.capped} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(result: ExperimentResult, out: Path, plots: bool = True) -> None:
    from lab.tuples import ResultRow, SweetSpotRow

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=1))
    _write_csv(out / "results.csv", result.rows, ResultRow)
    _write_csv(out / "budget_results.csv", result.budget_rows, ResultRow)
    _write_csv(out / "sweet_spots.csv", result.sweet_spots, SweetSpotRow)
    (out / "summary.md").write_text(_summary(result))
    if plots:
        _plot(result, out)


def _rows_at_budget(rows: list[ResultRow], budget: int) -> list[ResultRow]:
    """Per (variant, aggregator), the row with the largest n that fits the budget (the one the budget buys)."""
    best: dict[tuple[str, str], ResultRow] = {}
    for r in rows:
        key = (r.variant, r.aggregator)
        if r.flops_tuple <= budget and (key not in best or r.n > best[key].n):
            best[key] = r
    return list(best.values())


def _plot(result: ExperimentResult, out: Path) -> None:
    """Three figures: n-accuracy vs n, RI vs FLOPs per tuple, and n-accuracy vs compression per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r.variant for r in result.rows))
    aggs = list(dict.fromkeys(r.aggregator for r in result.rows))
    cols = min(len(variants), 5)
    nrows = -(-len(variants) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False, sharey=True)
    for ax, v in zip(axes.flat, variants, strict=False):
        for a in aggs:
            rs = [r for r in result.rows if r.variant == v and r.aggregator == a]
            ax.errorbar(
                [r.n for r in rs],
                [r.n_accuracy for r in rs],
                yerr=[[r.n_accuracy - r.n_accuracy_low for r in rs], [r.n_accuracy_high - r.n_accuracy for r in rs]],
                label=a,
                marker="o",
                ms=3,
                capsize=2,
            )
        ax.set_xscale("log", base=2)
        ax.set_title(v, fontsize=8)
        ax.set_xlabel("n")
    for ax in list(axes.flat)[len(variants) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel("n-accuracy")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "aggregation_n_accuracy.png", dpi=110)
    plt.close(fig)

    fig = ri_vs_flops_figure(result)
    fig.savefig(out / "aggregation_ri_vs_flops.png", dpi=110)
    plt.close(fig)

    fig = sweet_spot_figure(result)
    if fig is not None:
        fig.savefig(out / SWEET_SPOT_PNG, dpi=110)
        plt.close(fig)


def readable_limits(values: list[float], whisker: float = 3.0, min_spread: float = 0.5) -> tuple[float, float]:
    """Y limits that hold the bulk of `values`: the quartiles widened by `whisker` interquartile ranges (the
    range taken as at least `min_spread`, so tightly bunched data keeps its edges), never wider than the data,
    plus a margin. One RI of -70 beside values in [-1, 1] would otherwise flatten them all."""
    import numpy as np

    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0:
        return (0.0, 1.0)
    q1, q3 = np.percentile(v, [25, 75])
    spread = max(q3 - q1, min_spread)
    lo = max(float(v.min()), q1 - whisker * spread)
    hi = min(float(v.max()), q3 + whisker * spread)
    pad = 0.08 * max(hi - lo, 1e-3)
    return (lo - pad, hi + pad)


def ri_vs_flops_figure(result: ExperimentResult) -> Any:
    """RI against FLOPs per tuple, one panel per aggregator. When a value lies far below the bulk (outside
    `readable_limits`), the y axis turns symmetric-log: linear over [-1, 1], where the ordinary values lie,
    logarithmic below, so an RI of -70 is drawn at its value without flattening the rest and no point is clipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    variants = list(dict.fromkeys(r.variant for r in result.rows))
    aggs = list(dict.fromkeys(r.aggregator for r in result.rows))
    values = [r.ri for r in result.rows]
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = readable_limits(values)
    far = bool(finite) and (min(finite) < lo or max(finite) > hi)
    colours = plt.cm.tab10.colors
    markers = "osD^vP*Xph"
    fig, axes = plt.subplots(
        1, len(aggs), figsize=(3.4 * len(aggs) + 2.0, 4.0), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, a in zip(axes.flat, aggs, strict=True):
        for i, v in enumerate(variants):
            rs = [r for r in result.rows if r.variant == v and r.aggregator == a]
            colour, marker = colours[i % len(colours)], markers[i % len(markers)]
            ax.plot(
                [r.flops_tuple for r in rs],
                [r.ri for r in rs],
                marker=marker,
                ms=4,
                color=colour,
                label=v,
                linestyle="-" if i < 10 else "--",
            )
        ax.set_xscale("log")
        ax.set_title(a, fontsize=9)
        ax.set_xlabel("FLOPs per tuple")
        ax.grid(alpha=0.3)
    ax0 = axes[0, 0]
    if far:
        ymin, ymax = min(finite), max(finite)
        ax0.set_yscale("symlog", linthresh=1.0, linscale=2.0)
        ticks = [t for t in (-1.0, -0.5, 0.0, 0.5, 1.0) if ymin - 0.5 <= t <= max(ymax, 1.0)]
        decade = 10.0
        while -decade / 10 > ymin:
            ticks.insert(0, -decade)
            decade *= 10
        ax0.yaxis.set_major_locator(FixedLocator(ticks))
        ax0.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
        below = [-m * 10.0**k for k in range(0, 5) for m in range(2, 10)]  # unlabelled: -2..-9, -20..-90, ...
        ax0.yaxis.set_minor_locator(FixedLocator([t for t in below if t > ymin * 1.25]))
        ax0.set_ylim(ymin * 1.25 if ymin < -1 else ymin - 0.1, max(ymax, 1.0) + 0.1)
        ax0.set_ylabel("relative information\n(linear over [-1, 1], log below)")
    else:
        ax0.set_ylim(lo, hi)
        ax0.set_ylabel("relative information")
    missing = len(values) - len(finite)
    if missing:
        fig.suptitle(f"{missing} point(s) with a non-finite RI are not drawn", fontsize=8)
    handles, labels = ax0.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title="variant", title_fontsize=8)
    return fig


def sweet_spot_figure(result: ExperimentResult) -> Any:
    """n-accuracy against the fraction kept, one panel per FLOPs budget (None without budgets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    aggs = list(dict.fromkeys(r.aggregator for r in result.rows))
    budgets = list(dict.fromkeys(s.budget for s in result.sweet_spots))
    methods = [m for m in dict.fromkeys(r.method for r in result.budget_rows) if m != "dense"]
    if not budgets:
        return None
    fig, axes = plt.subplots(
        1, len(budgets), figsize=(3.4 * len(budgets) + 2.4, 3.8), squeeze=False, sharey=True, layout="constrained"
    )
    keeps = sparse_log_ticks(sorted({r.keep for r in result.budget_rows}, reverse=True))
    dense_flops = next((r.flops_item for r in result.rows if r.method == "dense"), 0)
    # averaging rules often coincide: each aggregator drawn narrower than the one before, so one that lies
    # exactly under another still shows as a band around it
    widths = [1.2 + 0.6 * (len(aggs) - 1 - i) for i in range(len(aggs))]
    for ax, b in zip(axes.flat, budgets, strict=True):
        brs = _rows_at_budget(result.budget_rows, b)
        # colour says the aggregator, line style and marker the pruning method: ten tab10 hues alone blurred
        for i, a in enumerate(aggs):
            for j, m in enumerate(methods or ["dense"]):
                rs = sorted((r for r in brs if r.aggregator == a and r.method in (m, "dense")), key=lambda r: -r.keep)
                if rs:
                    ax.plot(
                        [r.keep for r in rs],
                        [r.n_accuracy for r in rs],
                        color=plt.cm.tab10.colors[i % 10],
                        linestyle=("-", "--", ":", "-.")[j % 4],
                        marker="osD^"[j % 4],
                        ms=1.5 + widths[i],
                        linewidth=widths[i],
                        label=f"{a} {m}",
                    )
        ax.set_xscale("log")
        # one plain label per compression level present (log scale's minor labels overlapped: "4x10^-1 3x10^-1")
        ax.xaxis.set_major_locator(FixedLocator(keeps))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.invert_xaxis()
        passes = f" = {b / dense_flops:g} dense passes" if dense_flops else ""
        ax.set_title(f"budget {b:,} FLOPs{passes}", fontsize=8)
        ax.set_xlabel("fraction kept (n = budget / cost)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("n-accuracy")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title="aggregator, method", title_fontsize=8)
    return fig


def sparse_log_ticks(values: list[float], min_gap: float = 0.12) -> list[float]:
    """Tick positions from `values` (descending), dropping any closer than `min_gap` decades to the last kept
    one, so labels on a log axis never run into each other however many compression levels there are."""
    kept: list[float] = []
    for v in values:
        if v > 0 and (not kept or abs(math.log10(kept[-1]) - math.log10(v)) >= min_gap):
            kept.append(v)
    return kept


def main(argv: list[str] | None = None) -> int:
    """`python -m lab.run_tuples [options]`: the options of `register`, errors reported as the CLI does."""
    parser = argparse.ArgumentParser(prog="python -m lab.run_tuples")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tuples", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (ValueError, LookupError) as exc:
        print(f"lab.run_tuples: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
