"""PNG plots of a load test; matplotlib is an optional extra, imported only here and only when plotting.

Each configuration is one labelled point (a short id, spelled out in a key under the plot); nothing joins
two configurations except the Pareto front. Cost is the dense-kernel FLOPs per query, what a masked
(unstructured) variant actually runs on dense kernels. The dense oracle, and any reference configuration
in the data (the exact path), are drawn as reference points. Every latency percentile carries its sample
count, and a p99 of fewer than `MIN_P99_SAMPLES` answers is drawn hollow and says so."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.ranking_metrics import pareto_front
from service.loadtest.evaluate import ConfigSummary

__all__ = [
    "plot_results",
    "config_points",
    "latency_figure",
    "quality_figure",
    "ConfigPoint",
    "Reference",
    "LATENCY_PNG",
    "QUALITY_PNG",
    "MIN_P99_SAMPLES",
    "REFERENCE_CONFIGS",
]

LATENCY_PNG = "latency_vs_flops.png"
QUALITY_PNG = "recall_vs_flops.png"
MIN_P99_SAMPLES = 100  # below this a p99 is one of the few largest answers, not a percentile
REFERENCE_CONFIGS = ("oracle", "dense-oracle", "exact")  # config names (or prefixes) drawn as references


@dataclass(frozen=True)
class Reference:
    """A point to compare against, not a cascade configuration: NaN where it is not known."""

    name: str
    flops: float
    recall_at_k: float = math.nan
    agreement_at_k: float = math.nan


@dataclass(frozen=True)
class ConfigPoint:
    """One configuration on the cost-quality plane; `front` is computed on the plotted axes."""

    key: str
    config: str
    kernel_flops: float
    recall_at_k: float
    agreement_at_k: float
    front: bool
    sweet_spot: bool
    reference: bool


def _is_reference(config: str) -> bool:
    return any(config == name or config.startswith(f"{name} ") or config.startswith(f"{name}:")
               for name in REFERENCE_CONFIGS)  # fmt: skip


def _ok_weighted(rows: Sequence[Mapping[str, Any]], key: str, fallback: str | None = None) -> float:
    pairs = []
    for r in rows:
        value = float(r.get(key, math.nan))
        if math.isnan(value) and fallback is not None:
            value = float(r.get(fallback, math.nan))
        if int(r["ok"]) and not math.isnan(value):
            pairs.append((value, int(r["ok"])))
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def config_points(rows: Sequence[Mapping[str, Any]], summaries: Sequence[ConfigSummary]) -> list[ConfigPoint]:
    """Per configuration (in the order of `summaries`): its dense-kernel FLOPs (nonzero FLOPs when a row has
    no dense-kernel count), quality, and whether it is on the front of dense-kernel FLOPs vs recall@k."""
    by_config: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_config.setdefault(str(r["config"]), []).append(r)
    flops = [_ok_weighted(by_config.get(s.config, []), "flops_dense_kernel", "flops") for s in summaries]
    refs = [_is_reference(s.config) for s in summaries]
    costs = [math.nan if ref else f for f, ref in zip(flops, refs, strict=True)]
    front = set(pareto_front(costs, [s.recall_at_k for s in summaries]))
    return [
        ConfigPoint(
            key=str(i + 1),
            config=s.config,
            kernel_flops=flops[i],
            recall_at_k=s.recall_at_k,
            agreement_at_k=s.agreement_at_k,
            front=i in front,
            sweet_spot=s.sweet_spot,
            reference=refs[i],
        )
        for i, s in enumerate(summaries)
    ]


def _flops_text(flops: float) -> str:
    for scale, unit in ((1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")):
        if flops >= scale:
            return f"{flops / scale:,.1f} {unit}"
    return f"{flops:,.0f} FLOPs"


def _oracle(rows: Sequence[Mapping[str, Any]]) -> Reference | None:
    """The dense exhaustive oracle: its cost is in every answer (`dense_flops`); agreement with itself is 1."""
    dense = _ok_weighted(rows, "dense_flops")
    return None if math.isnan(dense) else Reference("dense oracle", dense, agreement_at_k=1.0)


def _key_text(points: Sequence[ConfigPoint]) -> str:
    lines = []
    for p in points:
        mark = "*" if p.sweet_spot else ("+" if p.front else ("r" if p.reference else " "))
        lines.append(f"{mark} {p.key:>3}  {p.config}")
    return "\n".join(lines)


KEY_LINE_INCHES = 0.125  # one line of 7-point monospace text
KEY_NOTE_LINES = 2


def _add_key(fig: Any, points: Sequence[ConfigPoint], note: str) -> None:
    fig.text(0.01, 0.01, f"{note}\n{_key_text(points)}", family="monospace", fontsize=7, va="bottom", ha="left")


def _figure_for(points: Sequence[ConfigPoint], width: float, plot_height: float, panels: int = 1) -> Any:
    """A figure with room below the axes for the key (one line per configuration)."""
    import matplotlib.pyplot as plt

    key_height = KEY_LINE_INCHES * (len(points) + KEY_NOTE_LINES) + 0.1
    fig, axes = plt.subplots(1, panels, figsize=(width, plot_height + key_height), squeeze=False, sharey=True)
    fig.subplots_adjust(bottom=(key_height + 0.55) / (plot_height + key_height), top=0.9, left=0.08, right=0.98,
                        wspace=0.08)  # fmt: skip
    return fig, axes[0]


def _panel_rows(rows: Sequence[Mapping[str, Any]], rate: float) -> tuple[list[Mapping[str, Any]], int]:
    """The rows at one rate and their most common answer count (named once in the panel's title)."""
    at = [r for r in rows if float(r["rate"]) == rate]
    counts = [int(r["ok"]) for r in at]
    return at, max(set(counts), key=counts.count) if counts else 0


def latency_figure(rows: Sequence[Mapping[str, Any]], points: Sequence[ConfigPoint]) -> Any:
    """One panel per request rate: per configuration p50 (dot) to p99 (triangle), with the number of answers
    behind them: in the title when a configuration has the panel's usual count, beside its id otherwise."""
    rates = sorted({float(r["rate"]) for r in rows})
    by_config = {p.config: p for p in points}
    fig, axes = _figure_for(points, max(7.0, 4.2 * len(rates)), 4.6, panels=max(1, len(rates)))
    few = False
    for ax, rate in zip(axes, rates, strict=False):
        at, usual = _panel_rows(rows, rate)
        for r in at:
            p = by_config.get(str(r["config"]))
            p50, p99, n = float(r["p50_ms"]), float(r["p99_ms"]), int(r["ok"])
            if p is None or math.isnan(p.kernel_flops) or math.isnan(p50):
                continue
            color = "tab:purple" if p.reference else ("tab:red" if p.front else "tab:blue")
            ax.vlines(p.kernel_flops, p50, p99, color=color, alpha=0.5, lw=1.5)  # one configuration's spread
            ax.plot([p.kernel_flops], [p50], "o", color=color, ms=5)
            thin = n < MIN_P99_SAMPLES
            few |= thin
            ax.plot([p.kernel_flops], [p99], "v" if not thin else "o", ms=6, color=color,
                    mfc="none" if thin else color)  # fmt: skip
            label = p.key if n == usual else f"{p.key} (n={n})"
            ax.annotate(label, (p.kernel_flops, p99), textcoords="offset points", xytext=(0, 5), ha="center",
                        fontsize=7, color=color)  # fmt: skip
        ax.set_xscale("log")
        ax.margins(y=0.12)
        ax.set_title(f"{rate:g} requests/s: n = {usual} answers each", fontsize=9)
        ax.set_xlabel("dense-kernel FLOPs per query")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("latency from scheduled send (ms)")
    fig.suptitle("Latency per configuration (open loop): dot p50, triangle p99, labelled by id", fontsize=10)
    note = "key: id  configuration   (+ Pareto front, * sweet spot, r reference)"
    if few:
        note += (f"\nhollow circle instead of a triangle: p99 of fewer than {MIN_P99_SAMPLES} answers, i.e. about the "
                 "largest one, not a percentile")  # fmt: skip
    _add_key(fig, points, note)
    return fig


def quality_figure(points: Sequence[ConfigPoint], references: Sequence[Reference] = (), k: int | None = None) -> Any:
    """recall@k and agreement@k per configuration against dense-kernel FLOPs, the Pareto front as a line, the
    sweet spot ringed, and the reference points (dense oracle, exact path) as stars."""
    fig, (ax,) = _figure_for(points, 9.0, 5.2)
    at = f"@{k}" if k else "@k"
    valid = [p for p in points if not (math.isnan(p.kernel_flops) or math.isnan(p.recall_at_k))]
    cascades = [p for p in valid if not p.reference]
    ax.scatter([p.kernel_flops for p in cascades], [p.recall_at_k for p in cascades], c="tab:gray", s=22,
               label=f"recall{at} (true labels)", zorder=3)  # fmt: skip
    agree = [p for p in cascades if not math.isnan(p.agreement_at_k)]
    ax.scatter([p.kernel_flops for p in agree], [p.agreement_at_k for p in agree], marker="x", c="tab:blue", s=22,
               label=f"agreement{at} with the dense oracle", zorder=3)  # fmt: skip
    front = sorted((p for p in cascades if p.front), key=lambda p: p.kernel_flops)
    if front:
        ax.step([p.kernel_flops for p in front], [p.recall_at_k for p in front], where="post", c="tab:red", lw=1.5,
                label="Pareto front (FLOPs vs recall)", zorder=2)  # fmt: skip
        ax.scatter([p.kernel_flops for p in front], [p.recall_at_k for p in front], s=70, facecolors="none",
                   edgecolors="tab:red", linewidths=1.5, zorder=4)  # fmt: skip
    for p in cascades:
        ax.annotate(p.key, (p.kernel_flops, p.recall_at_k), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if p.sweet_spot:
            ax.scatter([p.kernel_flops], [p.recall_at_k], s=200, facecolors="none", edgecolors="tab:green",
                       linewidths=2, zorder=5, label=f"sweet spot: {p.key}")  # fmt: skip
    refs = list(references) + [
        Reference(p.config, p.kernel_flops, p.recall_at_k, p.agreement_at_k) for p in valid if p.reference
    ]
    used: set[str] = set()
    for ref in refs:
        if math.isnan(ref.flops):
            continue
        ax.axvline(ref.flops, color="tab:purple", ls=":", lw=1)
        shown = [(y, m, w) for y, m, w in ((ref.recall_at_k, "*", "recall"), (ref.agreement_at_k, "P", "agreement"))
                 if not math.isnan(y)]  # fmt: skip
        for y, marker, what in shown:
            label = None if what in used else f"reference: {what}{at}"
            used.add(what)
            ax.scatter([ref.flops], [y], marker=marker, s=140, c="tab:purple", zorder=5, label=label)
        if shown:  # the name once, under the lowest of its points
            ax.annotate(f"{ref.name}\n{_flops_text(ref.flops)}", (ref.flops, min(y for y, _, _ in shown)),
                        textcoords="offset points", xytext=(0, -10), ha="center", va="top", fontsize=8,
                        color="tab:purple", bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("dense-kernel FLOPs per query (masked variants count every weight)")
    ax.set_ylabel(f"fraction of top{'-' + str(k) if k else '-k'}")
    ax.set_title("Quality vs cost per configuration", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _add_key(fig, points, "key: id  configuration   (+ Pareto front, * sweet spot, r reference)")
    return fig


def plot_results(
    rows: Sequence[dict[str, Any]],
    summaries: Sequence[ConfigSummary],
    out: Path,
    references: Sequence[Reference] = (),
) -> list[Path]:
    """Writes LATENCY_PNG and QUALITY_PNG under `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = config_points(rows, summaries)
    oracle = _oracle(rows)
    k = int(rows[0]["k"]) if rows and "k" in rows[0] else None
    written = []
    for name, fig in (
        (LATENCY_PNG, latency_figure(rows, points)),
        (QUALITY_PNG, quality_figure(points, ([oracle] if oracle else []) + list(references), k)),
    ):
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written
