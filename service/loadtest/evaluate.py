"""Turn one point's outcomes into a CSV row, and the rows into per-configuration totals with the Pareto front
and the sweet spot marked."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cascade.ranking_metrics import agreement_at_k, mean_over_queries, pareto_front, percentile, recall_at_k, sweet_spot
from service.loadtest.runner import PointRun

__all__ = ["CSV_COLUMNS", "summarize_point", "ConfigSummary", "summarize_configs"]

CSV_COLUMNS = (
    "config",
    "rate",
    "duration_s",
    "k",
    "sent",
    "ok",
    "errors",
    "error_rate",
    "throughput_rps",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "server_ms_mean",
    "flops",
    "flops_dense_kernel",
    "dense_flops",
    "flops_vs_dense",
    "recall_at_k",
    "agreement_at_k",
    "pareto",
    "sweet_spot",
    "first_error",
)


def summarize_point(
    config: str,
    rate: float,
    duration: float,
    k: int,
    run: PointRun,
    label_of: Callable[[int], int],
    relevant: Mapping[int, set[int]],
    oracle: Mapping[int, Sequence[int]],
) -> dict[str, Any]:
    """One CSV row. FLOPs, recall and agreement are means over the successful answers; latency percentiles
    are over successful answers too (an error has no meaningful latency), errors are counted separately.
    Throughput divides by the longer of the send window and the time to the last answer, so a backlog that
    drains after the window lowers it."""
    ok = [o for o in run.outcomes if o.ok and o.body is not None]
    lat_ms = [o.latency_s * 1000.0 for o in ok]
    recalls, agreements, flops, flops_dk, dense, server = [], [], [], [], [], []
    for o in ok:
        body = o.body or {}
        label = label_of(o.index)
        ids = [int(c["cluster_id"]) for c in body.get("clusters", [])]
        recalls.append(recall_at_k(ids, relevant.get(label, set()), k))
        agreements.append(agreement_at_k(ids, oracle[label], k) if label in oracle else math.nan)
        flops.append(float(body.get("flops", math.nan)))
        flops_dk.append(float(body.get("flops_dense_kernel", math.nan)))
        dense.append(float(body.get("dense_flops", math.nan)))
        server.append(float(body.get("latency_ms", math.nan)))
    sent = len(run.outcomes)
    errors = sent - len(ok)
    mean_flops, mean_dense = mean_over_queries(flops), mean_over_queries(dense)
    first_error = next((o.error for o in run.outcomes if o.error), "")
    return {
        "config": config,
        "rate": rate,
        "duration_s": duration,
        "k": k,
        "sent": sent,
        "ok": len(ok),
        "errors": errors,
        "error_rate": errors / sent if sent else math.nan,
        "throughput_rps": len(ok) / max(duration, run.wall_s),
        "p50_ms": percentile(lat_ms, 50),
        "p95_ms": percentile(lat_ms, 95),
        "p99_ms": percentile(lat_ms, 99),
        "max_ms": max(lat_ms, default=math.nan),
        "server_ms_mean": mean_over_queries(server),
        "flops": mean_flops,
        "flops_dense_kernel": mean_over_queries(flops_dk),
        "dense_flops": mean_dense,
        "flops_vs_dense": mean_flops / mean_dense if mean_dense and not math.isnan(mean_dense) else math.nan,
        "recall_at_k": mean_over_queries(recalls),
        "agreement_at_k": mean_over_queries(agreements),
        "pareto": False,
        "sweet_spot": False,
        "first_error": first_error,
    }


@dataclass
class ConfigSummary:
    """A configuration across all rates: cost and quality do not depend on the rate, latency does."""

    config: str
    flops: float
    recall_at_k: float
    agreement_at_k: float
    errors: int
    sent: int
    p99_by_rate: dict[float, float] = field(default_factory=dict)
    pareto: bool = False
    sweet_spot: bool = False


def _weighted(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    pairs = [(float(r[key]), int(r["ok"])) for r in rows if r["ok"] and not math.isnan(float(r[key]))]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def summarize_configs(rows: list[dict[str, Any]], tolerance: float) -> list[ConfigSummary]:
    """Per-configuration totals; marks `pareto` (FLOPs vs recall@k) and the `sweet_spot` on the summaries and
    on the rows in place. Only error-free configurations can be the sweet spot."""
    order: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        order.setdefault(r["config"], []).append(r)
    summaries = [
        ConfigSummary(
            config=name,
            flops=_weighted(group, "flops"),
            recall_at_k=_weighted(group, "recall_at_k"),
            agreement_at_k=_weighted(group, "agreement_at_k"),
            errors=sum(int(r["errors"]) for r in group),
            sent=sum(int(r["sent"]) for r in group),
            p99_by_rate={float(r["rate"]): float(r["p99_ms"]) for r in group},
        )
        for name, group in order.items()
    ]
    costs = [s.flops for s in summaries]
    quality = [s.recall_at_k for s in summaries]
    for i in pareto_front(costs, quality):
        summaries[i].pareto = True
    clean = [q if s.errors == 0 else math.nan for s, q in zip(summaries, quality, strict=True)]
    best = sweet_spot(costs, clean, tolerance)
    if best is not None:
        summaries[best].sweet_spot = True
    by_name = {s.config: s for s in summaries}
    for r in rows:
        r["pareto"] = by_name[r["config"]].pareto
        r["sweet_spot"] = by_name[r["config"]].sweet_spot
    return summaries
