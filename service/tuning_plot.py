"""The tuned front as a picture: quality against FLOPs and against milliseconds per query, every measured plan
grey, the Pareto front joined, the served plan marked, FAISS alone, the dense rerank and the oracle drawn for
reference. Top row: quality relative to the dense rerank (what the target is stated in); bottom row: graded
nDCG@10 against the truth (where FAISS alone can win). matplotlib is optional and imported only here."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from cascade.tuning_record import PlanPoint, TuningRecord

__all__ = ["plot_front", "FRONT_PNG"]

FRONT_PNG = "front.png"


def plot_front(record: TuningRecord, plans: list[PlanPoint], out: Path, served: bool = True) -> Path:
    """Writes `out/front.png` and returns its path. `served=False`: the chosen plan is not stored as the default
    (a dry run, or a search with the FAISS guard off), and its marker says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharey="row")
    rows = (("rel_ndcg", "nDCG@10 relative to the dense rerank"), ("ndcg", "graded nDCG@10 (truth)"))
    cols = (("flops", "FLOPs per query (log)"), ("ms", "median ms per query (1 thread)"))
    front = sorted(record.front, key=lambda p: p.flops)
    cascades = [p for p in plans if p.stages]
    order = sorted(cascades, key=lambda p: (p.flops, -p.rel_ndcg))
    unguarded, best = [], -math.inf  # the front of every measured cascade, FAISS alone or not
    for p in order:
        if p.rel_ndcg > best:
            unguarded.append(p)
            best = p.rel_ndcg
    for r, (quality, ylabel) in enumerate(rows):
        for c, (cost, xlabel) in enumerate(cols):
            ax = axes[r][c]
            ax.scatter(
                [getattr(p, cost) for p in plans],
                [getattr(p, quality) for p in plans],
                s=12,
                color="0.7",
                label=f"measured plans ({len(plans)})",
            )
            # the front is one of FLOPs against relative nDCG@10: joined only in that panel; elsewhere its plans
            # are points, since a line through them would zigzag and suggest a front that is not there
            defines_front = quality == "rel_ndcg" and cost == "flops"
            ordered = sorted(front, key=lambda p: getattr(p, cost))
            ax.plot(
                [getattr(p, cost) for p in ordered],
                [getattr(p, quality) for p in ordered],
                "-o" if defines_front else "o",
                color="tab:blue",
                ms=4,
                label="Pareto front (FLOPs vs relative nDCG@10; joined in that panel)",
            )
            if defines_front and [p.name for p in unguarded] != [p.name for p in front if p.stages]:
                ax.plot(
                    [getattr(p, cost) for p in unguarded],
                    [getattr(p, quality) for p in unguarded],
                    "--",
                    color="0.5",
                    lw=1,
                    label="front of all measured cascades (some lose to FAISS alone)",
                )
            for point, marker, colour, name in (
                (record.faiss_only, "s", "tab:green", "FAISS only"),
                (record.dense_rerank, "D", "tab:purple", f"dense rerank of FAISS top {record.dense_rerank.candidates}"),
            ):
                ax.scatter(
                    [getattr(point, cost)], [getattr(point, quality)], marker=marker, s=60, color=colour, label=name
                )
            oracle = record.oracle
            value = oracle.get("rel_ndcg" if quality == "rel_ndcg" else "ndcg")
            x = oracle.get("flops" if cost == "flops" else "ms")
            if x is not None and value is not None and math.isfinite(value):
                ax.scatter([x], [value], marker="X", s=70, color="black", label="oracle (dense on every item)")
            elif cost == "flops" and x is not None:
                ax.axvline(x, color="black", ls="--", lw=1, label="oracle's FLOPs (dense on every item)")
            chosen = record.chosen
            ax.scatter(
                [getattr(chosen, cost)],
                [getattr(chosen, quality)],
                marker="*",
                s=260,
                facecolors="none",  # hollow: a reference point it lands on (FAISS alone) stays visible
                edgecolors="tab:red",
                linewidths=1.5,
                zorder=5,
                label=f"served: {chosen.name}" if served else f"chosen, not served: {chosen.name}",
            )
            if cost == "flops":
                ax.set_xscale("log")
            if quality == "rel_ndcg" and record.target.kind == "quality":
                ax.axhline(record.target.value, color="tab:red", ls=":", lw=1, label=f"target {record.target.value:g}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        f"{record.space}: {record.dev_queries} dev queries, target {record.target.describe()}\n"
        + textwrap.fill(record.reason, 150),
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    out.mkdir(parents=True, exist_ok=True)
    path = out / FRONT_PNG
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
