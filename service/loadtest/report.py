"""What a load test leaves behind: `results.csv` (one row per configuration x rate) and `summary.txt`, a
one-screen digest naming the Pareto front and the sweet spot."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.loadtest.evaluate import CSV_COLUMNS, ConfigSummary

__all__ = ["write_csv", "summary_text", "CSV_FILE", "SUMMARY_FILE"]

CSV_FILE = "results.csv"
SUMMARY_FILE = "summary.txt"
MAX_TABLE_ROWS = 15  # one screen: the front first, then the rest by cost


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


def summary_text(
    summaries: Sequence[ConfigSummary], rates: Sequence[float], header: Sequence[str], dropped: int = 0
) -> str:
    """A fixed-width table: configuration, FLOPs, recall@k, agreement@k, errors, p99 per rate."""
    lines = list(header)
    shown = sorted(summaries, key=lambda s: (not s.pareto, math.inf if math.isnan(s.flops) else s.flops))
    rate_cols = "".join(f"{'p99@' + format(r, 'g'):>10}" for r in rates)
    width = max([len(s.config) for s in shown] + [6])
    lines.append(f"  {'config':<{width}} {'MFLOPs':>10} {'recall':>7} {'agree':>7} {'errors':>7}{rate_cols}")
    for s in shown[:MAX_TABLE_ROWS]:
        mark = "*" if s.sweet_spot else ("+" if s.pareto else " ")
        p99 = "".join(f"{_num(s.p99_by_rate.get(float(r), math.nan), '.1f'):>10}" for r in rates)
        lines.append(
            f"{mark} {s.config:<{width}} {_num(s.flops / 1e6, '.3f'):>10} {_num(s.recall_at_k, '.3f'):>7}"
            f" {_num(s.agreement_at_k, '.3f'):>7} {s.errors:>7}{p99}"
        )
    if len(shown) > MAX_TABLE_ROWS:
        lines.append(f"  ... {len(shown) - MAX_TABLE_ROWS} more configurations in the CSV")
    lines.append("  + Pareto front (FLOPs vs recall@k)   * sweet spot   p99 in ms, measured from the scheduled send")
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
