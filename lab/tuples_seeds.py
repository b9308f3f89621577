"""Several seeds of `python -m lab.run_tuples --source both`, summarised for docs/aggregation.md.

    lab/run_tuples_seeds.sh /work/home-tuples var/bench 0 1 2     # the runs (long; 1 torch thread)
    .venv/bin/python -m lab.tuples_seeds var/bench/tuples-s0 var/bench/tuples-s1 var/bench/tuples-s2

Reads each run's `results.json` and prints Markdown: the sweet spot per budget and aggregator for every seed,
with FLOPs per item counted nonzero (as `lab.run_tuples` does) and dense-kernel (a masked variant then costs what the
dense model costs); the n-accuracy of each fine-tuned variant of the registry at the largest n its budget buys
(to see whether the best compression level of that family is interior); and each variant's single-item accuracy.
No torch: it only reads the JSON files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.ranking_metrics import best_within_budget

__all__ = ["Run", "load_run", "affine_agg_flops", "largest_n", "sweet_spot", "main"]

AVERAGING = ("mean_prob", "mean_logit", "bayes")


@dataclass
class Run:
    """One seed's results: rows at the fixed ns and rows at the n each budget buys (nonzero counting)."""

    seed: int
    budgets: list[int]
    passes: list[float]
    rows: list[dict[str, Any]]
    cap: int
    """The largest n the run considered for a budget."""

    def variants(self) -> list[str]:
        return list(dict.fromkeys(r["variant"] for r in self.rows))

    def row(self, variant: str, aggregator: str, n: int) -> dict[str, Any] | None:
        for r in self.rows:
            if r["variant"] == variant and r["aggregator"] == aggregator and r["n"] == n:
                return r
        return None


def load_run(directory: Path) -> Run:
    data = json.loads((directory / "results.json").read_text())
    cfg = data["config"]
    # rows at the fixed ns and at each budget's n: same tuples for the same (seed, n), so one pool of rows
    pool: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in data["rows"] + data["budget_rows"]:
        pool[(r["variant"], r["aggregator"], r["n"])] = r
    return Run(
        cfg["seed"], list(cfg["budgets"]), list(cfg["budgets_in_dense_passes"]), list(pool.values()), cfg["n_cap"]
    )


def affine_agg_flops(run: Run, variant: str, aggregator: str) -> tuple[int, int]:
    """(per member, fixed) aggregation FLOPs, read from the rows at n = 1 and 2 (every aggregator is affine in n)."""
    one, two = run.row(variant, aggregator, 1), run.row(variant, aggregator, 2)
    if one is None or two is None:
        raise ValueError(f"{variant}/{aggregator}: rows at n = 1 and 2 are needed")
    per = two["flops_aggregator"] - one["flops_aggregator"]
    return per, one["flops_aggregator"] - per


def largest_n(budget: int, item: int, agg: tuple[int, int], cap: int) -> int:
    """The largest n <= cap with n * item + agg cost <= budget (0 if none), as `lab.tuples.largest_n_within`."""
    per, fixed = agg
    n = 0
    while n < cap and (n + 1) * (item + per) + fixed <= budget:
        n += 1
    return n


def sweet_spot(
    run: Run, budget: int, aggregators: Iterable[str], dense_kernel: bool
) -> tuple[dict[str, Any] | None, list[str]]:
    """The best (n-accuracy, then RI) row among variants affordable at `budget` for any of `aggregators`, and the
    variants whose affordable n was not evaluated (only possible with dense-kernel counting)."""
    rows, costs, missing = [], [], []
    for v in run.variants():
        for a in aggregators:
            one = run.row(v, a, 1)
            if one is None:
                continue
            item = one["flops_item_dense_kernel"] if dense_kernel else one["flops_item"]
            per, fixed = affine_agg_flops(run, v, a)
            n = largest_n(budget, item, (per, fixed), run.cap)
            if n < 1:
                continue
            r = run.row(v, a, n)
            if r is None:
                missing.append(f"{v}/{a} n={n}")
                continue
            rows.append(r)
            costs.append(n * (item + per) + fixed)  # what `largest_n` kept within the budget
    best = best_within_budget(costs, [(r["n_accuracy"], r["ri"]) for r in rows], budget)
    return (None if best is None else rows[best]), missing


def _cell(r: dict[str, Any] | None, interval: bool = True, aggregator: bool = False) -> str:
    if r is None:
        return "nothing affordable"
    text = f"`{r['variant']}` n={r['n']}" + (f" {r['aggregator']}" if aggregator else "") + f": {r['n_accuracy']:.4f}"
    if interval:
        text += f" [{r['n_accuracy_low']:.4f}, {r['n_accuracy_high']:.4f}]"
    return text


def _fmt_pass(p: float) -> str:
    return f"{p:g}"


def sweet_spot_table(runs: Sequence[Run], groups: dict[str, Sequence[str]], dense_kernel: bool) -> list[str]:
    seeds = " / ".join(f"seed {r.seed}" for r in runs)
    lines = [f"| budget (dense passes) | {' | '.join(groups)} |", "|---|" + "---|" * len(groups)]
    for i, passes in enumerate(runs[0].passes):
        cells = []
        for aggs in groups.values():
            per_seed, bests = [], []
            for run in runs:
                best, missing = sweet_spot(run, run.budgets[i], aggs, dense_kernel)
                bests.append(best)
                per_seed.append(
                    _cell(best, aggregator=len(aggs) > 1)
                    + (f" (not evaluated: {', '.join(missing)})" if missing else "")
                )
            winners = {None if b is None else (b["variant"], b["n"]) for b in bests}
            if winners == {None}:
                cells.append("nothing affordable")
            elif len(winners) == 1 and None not in winners and "not evaluated" not in "".join(per_seed):
                b0 = bests[0]
                values = " / ".join(
                    f"{b['n_accuracy']:.4f} [{b['n_accuracy_low']:.4f}, {b['n_accuracy_high']:.4f}]" for b in bests
                )
                cells.append(f"`{b0['variant']}` n={b0['n']}: {values}")  # the same winner in every seed
            else:
                cells.append("<br>".join(per_seed))
        lines.append(f"| {_fmt_pass(passes)} | {' | '.join(cells)} |")
    note = f"Cells: {seeds}; one line per seed unless every seed has the same winner and n."
    return [note, "", *lines]


def family_table(runs: Sequence[Run], family: Sequence[str], aggregator: str, intervals: bool = False) -> list[str]:
    """n-accuracy of each variant of `family` at the largest n each budget buys, one column per variant."""
    lines = [f"| budget (dense passes) | {' | '.join(f'`{v}`' for v in family)} |", "|---|" + "---|" * len(family)]
    for i, passes in enumerate(runs[0].passes):
        cells = []
        for v in family:
            ns, vals = set(), []
            for run in runs:
                one = run.row(v, aggregator, 1)
                n = (
                    largest_n(run.budgets[i], one["flops_item"], affine_agg_flops(run, v, aggregator), run.cap)
                    if one
                    else 0
                )
                r = run.row(v, aggregator, n) if n else None
                ns.add(n)
                text = "-" if r is None else f"{r['n_accuracy']:.3f}"
                if r is not None and intervals:
                    text += f" [{r['n_accuracy_low']:.3f}, {r['n_accuracy_high']:.3f}]"
                vals.append(text)
            n_text = f"n={'/'.join(str(n) for n in sorted(ns))}: " if any(ns) else ""
            cells.append(n_text + " / ".join(vals))
        lines.append(f"| {_fmt_pass(passes)} | {' | '.join(cells)} |")
    return lines


def equal_n_table(
    runs: Sequence[Run], variants: Sequence[str], aggregators: Sequence[str], ns: Sequence[int]
) -> list[str]:
    """n-accuracy per variant and n for each aggregator, aggregation cost ignored (does a gadget share evidence
    better than averaging at the same n?). Cells: seeds separated by ' / '."""
    lines = [f"| variant | n | {' | '.join(aggregators)} |", "|---|---|" + "---|" * len(aggregators)]
    for v in variants:
        for n in ns:
            cells = []
            for a in aggregators:
                vals = [f"{r['n_accuracy']:.3f}" for run in runs if (r := run.row(v, a, n))]
                cells.append(" / ".join(vals) or "-")
            lines.append(f"| `{v}` | {n} | {' | '.join(cells)} |")
    return lines


def family_figure(runs: Sequence[Run], family: Sequence[str], aggregators: Sequence[str], path: Path) -> None:
    """n-accuracy (95% interval) of the fine-tuned family against the fraction kept, one panel per budget at which
    at least two of its variants are affordable; one line per aggregator and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for i in range(len(runs[0].passes)):
        affordable = [
            v for v in family if (one := runs[0].row(v, "mean_logit", 1)) and one["flops_item"] <= runs[0].budgets[i]
        ]
        if len(affordable) >= 2:
            panels.append(i)
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 0.5, 3.0 * rows), squeeze=False, sharey=True)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    colors = dict(zip(aggregators, ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple"), strict=False))
    markers = ("o", "s", "^", "v", "D")
    for ax, i in zip(axes.flat, panels, strict=False):
        for a in aggregators:
            for k, run in enumerate(runs):
                xs, ys, lo, hi = [], [], [], []
                for v in family:
                    one = run.row(v, a, 1)
                    n = largest_n(run.budgets[i], one["flops_item"], affine_agg_flops(run, v, a), run.cap) if one else 0
                    r = run.row(v, a, n) if n else None
                    if r is not None:
                        xs.append(r["keep"])
                        ys.append(r["n_accuracy"])
                        lo.append(r["n_accuracy"] - r["n_accuracy_low"])
                        hi.append(r["n_accuracy_high"] - r["n_accuracy"])
                label = f"{a}, seed {run.seed}"
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[lo, hi],
                    color=colors[a],
                    marker=markers[k % len(markers)],
                    ms=3,
                    lw=0.8,
                    capsize=2,
                    label=label,
                )
        ax.set_xscale("log")
        keeps = sorted({r["keep"] for r in runs[0].rows if r["variant"] in family})
        ax.set_xticks(keeps, [f"{k:g}" for k in keeps], fontsize=7)
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_title(f"{runs[0].passes[i]:g} dense pass ({runs[0].budgets[i]:,} FLOPs)", fontsize=8)
        ax.set_xlabel("fraction kept (fine-tuned, structured)", fontsize=8)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("n-accuracy at the n the budget buys", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    spare = list(axes.flat)[len(panels) :]
    if spare:  # the legend goes into the first empty panel
        spare[0].legend(handles, labels, loc="center", fontsize=7, title="aggregator, seed", title_fontsize=8)
        fig.tight_layout()
    else:
        fig.legend(handles, labels, loc="center right", fontsize=6)
        fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def variant_table(runs: Sequence[Run]) -> list[str]:
    lines = [
        "| variant | method | keep | FLOPs/item nonzero | dense-kernel | single-item accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for v in runs[0].variants():
        r = runs[0].row(v, "mean_logit", 1)
        if r is None:
            continue
        accs = " / ".join(f"{x['accuracy']:.4f}" for run in runs if (x := run.row(v, "mean_logit", 1)))
        cost = f"{r['flops_item']:,} | {r['flops_item_dense_kernel']:,}"
        lines.append(f"| `{v}` | {r['method']} | {r['keep']:g} | {cost} | {accs} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="output directories of `python -m lab.run_tuples`")
    p.add_argument("--family", default="cnn-s05:1,cnn-s10:1,cnn-s15:1,cnn-s25:1,cnn-s50:1,dense:1")
    p.add_argument("--figure", type=Path, help="also draw the fine-tuned family's n-accuracy per budget (PNG)")
    p.add_argument("--intervals", action="store_true", help="95%% intervals in the family tables too")
    args = p.parse_args(argv)
    runs = [load_run(d) for d in args.runs]
    groups = {"mean_logit / bayes": ("mean_logit", "bayes"), "lstm": ("lstm",), "deepsets": ("deepsets",)}
    family = [v for v in args.family.split(",") if v]
    out = ["## Variants (single-item test accuracy per seed)", "", *variant_table(runs), ""]
    out += ["## Sweet spot, FLOPs per item counted nonzero", "", *sweet_spot_table(runs, groups, False), ""]
    out += ["## Sweet spot, FLOPs per item counted dense-kernel", "", *sweet_spot_table(runs, groups, True), ""]
    for agg in ("mean_logit", "bayes", "lstm", "deepsets"):
        out += [f"## Fine-tuned family with `{agg}`: n-accuracy at the n the budget buys, per seed", ""]
        out += [*family_table(runs, family, agg, args.intervals), ""]
    aggs = ("mean_logit", "bayes", "lstm", "deepsets")
    out += ["## Equal n (aggregation cost ignored), per seed", ""]
    out += [*equal_n_table(runs, [*family, "magnitude@0.1"], aggs, (1, 4, 16)), ""]
    print("\n".join(out))
    if args.figure:
        family_figure(runs, family, ("bayes", "lstm", "deepsets"), args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
