"""Synthetic load-test rows (the shape `summarize_point` writes), for plot and report tests."""

from __future__ import annotations

import math
from typing import Any

from service.loadtest.evaluate import CSV_COLUMNS

DENSE_FLOPS = 50_000_000.0
# name, nonzero FLOPs, dense-kernel FLOPs, recall@k, agreement@k, server-side ms
CONFIGS = [
    ("cnn-s25/2/200 > cnn-s50/4/40 > dense/10", 1.2e6, 1.2e6, 0.93, 0.90, 9.0),
    ("cnn-m10/2/200 > dense/10", 0.4e6, 2.9e6, 0.88, 0.85, 12.0),  # masked: few nonzero, many kernel FLOPs
    ("cnn-s25/4/200 > dense/10", 2.0e6, 2.0e6, 0.95, 0.93, 14.0),
    ("cnn-s50/4/100 > dense/10", 3.5e6, 3.5e6, 0.96, 0.95, 21.0),
    ("cnn-s25/2/100 > dense/10", 0.9e6, 0.9e6, 0.80, 0.78, 7.0),
    ("dense/10", 9.0e6, 9.0e6, 0.97, 0.97, 60.0),
]


def row(config: str, rate: float, ok: int, nonzero: float, kernel: float, recall: float, agree: float,
        ms: float) -> dict[str, Any]:  # fmt: skip
    r: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, math.nan)
    r.update(
        config=config,
        rate=rate,
        duration_s=ok / rate,
        k=10,
        sent=ok,
        ok=ok,
        errors=0,
        error_rate=0.0,
        throughput_rps=rate,
        p50_ms=ms * (1 + rate / 40),
        p95_ms=ms * (1.6 + rate / 20),
        p99_ms=ms * (2 + rate / 10),
        max_ms=ms * (2.5 + rate / 10),
        server_ms_mean=ms,
        flops=nonzero,
        flops_dense_kernel=kernel,
        dense_flops=DENSE_FLOPS,
        flops_vs_dense=nonzero / DENSE_FLOPS,
        recall_at_k=recall,
        agreement_at_k=agree,
        pareto=False,
        sweet_spot=False,
        first_error="",
    )
    return r


def synthetic_rows(rates: tuple[float, ...] = (5.0, 20.0), seconds: float = 10.0) -> list[dict[str, Any]]:
    """Every configuration at every rate; `rate * seconds` answers per point (so 50 at 5/s: a thin p99)."""
    return [row(c[0], rate, int(rate * seconds), *c[1:]) for rate in rates for c in CONFIGS]
