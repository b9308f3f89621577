"""What a load test leaves behind: `results.csv` (one row per configuration x rate) and `summary.txt`, a
one-screen digest naming the Pareto front and the sweet spot."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from service.loadtest.evaluate import CSV_COLUMNS, ConfigSummary

__all__ = ["write_csv", "summary_text", "CSV_FILE", "SUMMARY_FILE"]

CSV_FILE = "results.csv"
SUMMARY_FILE = "summary.txt"
MAX_TABLE_ROWS = 15  # one screen: the front first, then the rest by cost
MIN_P99_SAMPLES = 100  # a p99 of fewer answers is about the largest one (service.loadtest.plots says the same)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _cell(r[c]) for c in CSV_COLUMNS})


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _num(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else format(value, fmt)


def _per_rate(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, float], Mapping[str, Any]]:
    return {(str(r["config"]), float(r["rate"])): r for r in rows}


def _kernel_mflops(rows: Sequence[Mapping[str, Any]], config: str) -> float:
    """Answer-weighted dense-kernel FLOPs of a configuration (what masked variants run on dense kernels)."""
    pairs = [(float(r["flops_dense_kernel"]), int(r["ok"])) for r in rows
             if r["config"] == config and int(r["ok"]) and not math.isnan(float(r["flops_dense_kernel"]))]  # fmt: skip
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total / 1e6 if total else math.nan


def _p99_cell(p99: float, row: Mapping[str, Any] | None) -> str:
    """`52.3 (50)`: the p99 and the answers behind it; `~` when they are too few for a 99th percentile."""
    if row is None:
        return _num(p99, ".1f")
    n = int(row["ok"])
    return f"{'~' if n < MIN_P99_SAMPLES else ''}{_num(p99, '.1f')} ({n})"


def summary_text(
    summaries: Sequence[ConfigSummary],
    rates: Sequence[float],
    header: Sequence[str],
    dropped: int = 0,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """A fixed-width table: configuration, FLOPs, recall@k, agreement@k, errors, p99 per rate. With the CSV
    `rows`, also the dense-kernel FLOPs and, beside every p99, the number of answers it was taken over."""
    lines = list(header)
    shown = sorted(summaries, key=lambda s: (not s.pareto, math.inf if math.isnan(s.flops) else s.flops))
    by_point = _per_rate(rows) if rows is not None else {}
    cell = 16 if rows is not None else 10
    rate_cols = "".join(f"{'p99@' + format(r, 'g') + (' (n)' if rows is not None else ''):>{cell}}" for r in rates)
    kernel_col = f" {'kernel MF':>10}" if rows is not None else ""
    width = max([len(s.config) for s in shown] + [6])
    lines.append(
        f"  {'config':<{width}} {'MFLOPs':>10}{kernel_col} {'recall':>7} {'agree':>7} {'errors':>7}{rate_cols}"
    )
    thin = False
    for s in shown[:MAX_TABLE_ROWS]:
        mark = "*" if s.sweet_spot else ("+" if s.pareto else " ")
        cells = []
        for r in rates:
            row = by_point.get((s.config, float(r)))
            thin |= row is not None and int(row["ok"]) < MIN_P99_SAMPLES
            cells.append(f"{_p99_cell(s.p99_by_rate.get(float(r), math.nan), row):>{cell}}")
        kernel = f" {_num(_kernel_mflops(rows, s.config), '.3f'):>10}" if rows is not None else ""
        lines.append(
            f"{mark} {s.config:<{width}} {_num(s.flops / 1e6, '.3f'):>10}{kernel} {_num(s.recall_at_k, '.3f'):>7}"
            f" {_num(s.agreement_at_k, '.3f'):>7} {s.errors:>7}{''.join(cells)}"
        )
    if len(shown) > MAX_TABLE_ROWS:
        lines.append(f"  ... {len(shown) - MAX_TABLE_ROWS} more configurations in the CSV")
    lines.append("  + Pareto front (FLOPs vs recall@k)   * sweet spot   p99 in ms, measured from the scheduled send")
    if rows is not None:
        lines.append(
            "  MFLOPs: nonzero-weight FLOPs; kernel MF: dense-kernel MFLOPs (masked variants run every weight)"
        )
        lines.append("  (n): answers the p99 was taken over")
    if thin:
        lines.append(
            f"  ~: fewer than {MIN_P99_SAMPLES} answers, so that p99 is about the largest one, not a percentile"
        )
    if dropped:
        lines.append(f"  {dropped} grid combinations skipped as invalid (see the log)")
    spot = next((s for s in summaries if s.sweet_spot), None)
    if spot is None:
        lines.append("sweet spot: none (no configuration answered every request)")
    else:
        lines.append(
            f"sweet spot: {spot.config}  ({_num(spot.flops / 1e6, '.3f')} MFLOPs/query, recall@k "
            f"{_num(spot.recall_at_k, '.3f')}, agreement@k {_num(spot.agreement_at_k, '.3f')})"
        )
    return "\n".join(lines) + "\n"
