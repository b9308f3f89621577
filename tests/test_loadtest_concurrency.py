"""The load tester's throughput-against-concurrency sweep on a real server: every (kind, concurrency) point is
measured with the server's CPU from /proc, and the CSV and the plot are written."""

from __future__ import annotations

import csv
import math

from service.loadtest.concurrency import CONCURRENCY_CSV, CONCURRENCY_PNG, run_sweep, write_sweep


def test_the_sweep_measures_every_kind_and_concurrency_with_the_server_cpu(server, tmp_path) -> None:
    rows = run_sweep(
        server.url, [1, 2], ("cascade", "faiss", "exact"), duration=0.6, k=5, server_pid=server.process.pid
    )
    assert [(r.kind, r.concurrency) for r in rows] == [(k, c) for k in ("cascade", "faiss", "exact") for c in (1, 2)]
    for r in rows:
        assert r.errors == 0 and r.completed > 0 and r.qps > 0
        assert r.p50_ms <= r.p99_ms
        assert r.server_cpu > 0 and math.isfinite(r.server_cpu)  # the server worked while the clients waited
    assert all(r.ratio_to_first == 1.0 for r in rows if r.concurrency == 1)
    # which path answered, as the answers say: FAISS alone for `"stages": []`, the exact table for labels, and the
    # home's default plan for queries by example (the tiny home serves no reader: its pair cascade)
    assert {r.kind: r.modes for r in rows} == {"cascade": "cascade", "faiss": "faiss", "exact": "exact"}
    files = write_sweep(rows, tmp_path)
    assert {f.name for f in files} == {CONCURRENCY_CSV, CONCURRENCY_PNG}
    assert (tmp_path / CONCURRENCY_PNG).stat().st_size > 10_000
    with (tmp_path / CONCURRENCY_CSV).open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
