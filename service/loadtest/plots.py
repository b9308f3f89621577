"""PNG plots of a load test; matplotlib is an optional extra, imported only here and only when plotting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.loadtest.evaluate import ConfigSummary

__all__ = ["plot_results", "LATENCY_PNG", "QUALITY_PNG"]

LATENCY_PNG = "latency_vs_flops.png"
QUALITY_PNG = "recall_vs_flops.png"


def plot_results(rows: Sequence[dict[str, Any]], summaries: Sequence[ConfigSummary], out: Path) -> list[Path]:
    """p50/p99 latency vs FLOPs per rate, and recall@k / agreement@k vs FLOPs with the front and sweet spot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for rate in sorted({float(r["rate"]) for r in rows}):
        pts = sorted((r["flops"], r["p50_ms"], r["p99_ms"]) for r in rows if float(r["rate"]) == rate)
        pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[2]))]
        if not pts:
            continue
        line = ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"p99 @ {rate:g}/s")[0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", ls=":", color=line.get_color(), alpha=0.7)
    ax.set_xlabel("FLOPs per query")
    ax.set_ylabel("latency from scheduled send (ms); dotted: p50")
    ax.set_title("Latency vs FLOPs (open loop)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / LATENCY_PNG, dpi=110)
    plt.close(fig)
    written.append(out / LATENCY_PNG)

    fig, ax = plt.subplots(figsize=(8, 5))
    valid = [s for s in summaries if not (math.isnan(s.flops) or math.isnan(s.recall_at_k))]
    ax.scatter([s.flops for s in valid], [s.recall_at_k for s in valid], c="tab:gray", label="recall@k")
    agree = [s for s in valid if not math.isnan(s.agreement_at_k)]
    ax.scatter([s.flops for s in agree], [s.agreement_at_k for s in agree], marker="x", c="tab:blue",
               label="agreement@k with dense oracle")  # fmt: skip
    front = sorted((s for s in valid if s.pareto), key=lambda s: s.flops)
    if front:
        ax.step([s.flops for s in front], [s.recall_at_k for s in front], where="post", c="tab:red",
                label="Pareto front (recall)")  # fmt: skip
    xs = [s.flops for s in valid]
    mid = (min(xs) + max(xs)) / 2 if xs else 0.0
    for s in valid:
        if s.sweet_spot:
            right = s.flops > mid  # label on the inner side, so it stays inside the axes
            ax.scatter([s.flops], [s.recall_at_k], s=160, facecolors="none", edgecolors="tab:green", linewidths=2)
            ax.annotate(f"sweet spot: {s.config}", (s.flops, s.recall_at_k), textcoords="offset points",
                        xytext=(-10 if right else 10, -16), ha="right" if right else "left", fontsize="small",
                        color="tab:green")  # fmt: skip
    ax.set_xlabel("FLOPs per query")
    ax.set_ylabel("fraction of top-k")
    ax.set_title("Quality vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(out / QUALITY_PNG, dpi=110)
    plt.close(fig)
    written.append(out / QUALITY_PNG)
    return written
