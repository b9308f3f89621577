"""Throughput against concurrency: closed-loop clients (each sends its next query when the last one returned, on
its own keep-alive connection) at several concurrencies, for three kinds of query, with the server's CPU; a CSV
and a plot.

Kinds: `cascade` (the shipped held-out queries by example, answered by the server's default plan: the cluster
reader where one is served, else the default pair cascade or FAISS alone; a new seed each),
`faiss` (the same queries, `"stages": []`) and `exact` (label queries, answered from the exact table). The
server's CPU comes from /proc/PID/stat of `server_pid` and its descendants (a server on this host, its worker
processes included) or, without a pid, from the `process_cpu_seconds_total` the server exports on /metrics (one
worker's, when it runs several). 100% is one core."""

from __future__ import annotations

import asyncio
import csv
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from cascade.ranking_metrics import percentile
from service.loadtest.process_tree import tree_cpu_seconds

__all__ = [
    "KINDS",
    "KIND_LABELS",
    "SweepRow",
    "run_sweep",
    "write_sweep",
    "sweep_figure",
    "CONCURRENCY_PNG",
    "CONCURRENCY_CSV",
]

KINDS = ("cascade", "faiss", "exact")
KIND_LABELS = {
    "cascade": "by example, the default plan",
    "faiss": "by example, FAISS alone",
    "exact": "label, the exact table",
}
CONCURRENCY_PNG = "throughput_vs_concurrency.png"
CONCURRENCY_CSV = "concurrency.csv"


@dataclass(frozen=True)
class SweepRow:
    kind: str
    concurrency: int
    qps: float
    completed: int
    errors: int
    p50_ms: float
    p99_ms: float
    server_cpu: float  # cores busy on average (1.0 = one core); NaN when unknown
    ratio_to_first: float  # qps over the kind's qps at the first concurrency of the sweep
    modes: str = ""  # the answers' `mode`s (which path answered: reader, cascade, faiss, exact), "+"-joined


async def _metrics_cpu_seconds(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("process_cpu_seconds_total"):
            return float(line.split()[-1])
    return float("nan")


async def _bodies(client: httpx.AsyncClient, k: int, count: int) -> dict[str, list[dict[str, Any]]]:
    page = (await client.get("/v1/space/queries", params={"offset": 0, "limit": count})).json()
    space = (await client.get("/v1/space")).json()
    cascade = [{"target": {"examples": [q["x"]]}, "k": k} for q in page["queries"]]
    return {
        "cascade": cascade,
        "faiss": [{**b, "stages": []} for b in cascade],
        "exact": [{"target": {"label": int(label)}, "k": k, "mode": "exact"} for label in space["classes"]],
    }


async def _wait_exact(client: httpx.AsyncClient, seconds: float = 300.0) -> None:
    """Label queries are table lookups only once the exact table is built (`GET /v1/space`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (await client.get("/v1/space")).json().get("exact", {}).get("state") == "ready":
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("the exact table was not built in time")


async def _closed_loop(
    url: str, bodies: list[dict[str, Any]], clients: int, duration: float
) -> tuple[list, int, set[str]]:
    """Latencies of the answered queries, the errors, and which paths answered (the `mode` of each client's first
    answer: a server's default for queries by example is the cluster reader where one is served, else the pair
    cascade or FAISS alone)."""
    latencies: list[float] = []
    errors = 0
    seq = 0
    modes: set[str] = set()
    stop = time.monotonic() + duration

    async def worker() -> None:
        nonlocal errors, seq
        first = True
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
            while time.monotonic() < stop:
                body = bodies[seq % len(bodies)]
                if "examples" in body["target"]:
                    body = {**body, "seed": seq}
                seq += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post("/v1/query", json=body)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                    if first:  # one parse per client, off the timed part
                        modes.add(str(response.json().get("mode")))
                        first = False
                else:
                    errors += 1

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, errors, modes


async def _sweep(
    url: str, concurrency: Sequence[int], kinds: Sequence[str], duration: float, k: int, server_pid: int | None
) -> list[SweepRow]:
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        bodies = await _bodies(client, k, 100)
        if "exact" in kinds:
            await _wait_exact(client)
        rows: list[SweepRow] = []
        for kind in kinds:
            await _closed_loop(url, bodies[kind], max(concurrency), min(duration, 1.0))  # warm-up
            first = None
            for c in concurrency:
                cpu0 = tree_cpu_seconds(server_pid) if server_pid else await _metrics_cpu_seconds(client)
                t0 = time.monotonic()
                latencies, errors, modes = await _closed_loop(url, bodies[kind], c, duration)
                wall = time.monotonic() - t0
                cpu1 = tree_cpu_seconds(server_pid) if server_pid else await _metrics_cpu_seconds(client)
                qps = len(latencies) / wall
                first = first if first is not None else qps
                rows.append(
                    SweepRow(
                        kind,
                        c,
                        qps,
                        len(latencies),
                        errors,
                        percentile(latencies, 50) if latencies else float("nan"),
                        percentile(latencies, 99) if latencies else float("nan"),
                        (cpu1 - cpu0) / wall,
                        qps / first if first else float("nan"),
                        "+".join(sorted(modes)),
                    )
                )
        return rows


def run_sweep(
    url: str,
    concurrency: Sequence[int],
    kinds: Sequence[str] = KINDS,
    duration: float = 5.0,
    k: int = 10,
    server_pid: int | None = None,
) -> list[SweepRow]:
    """Every kind at every concurrency, in that order, `duration` seconds each."""
    if not concurrency or min(concurrency) < 1:
        raise ValueError("concurrency: positive client counts")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    return asyncio.run(_sweep(url.rstrip("/"), list(concurrency), list(kinds), duration, k, server_pid))


def sweep_figure(rows: Sequence[SweepRow]) -> Any:
    """Two panels over the concurrency: queries per second (one line per kind), and the server's CPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 6.5), sharex=True, height_ratios=(2, 1))
    for i, kind in enumerate(dict.fromkeys(r.kind for r in rows)):
        sel = [r for r in rows if r.kind == kind]
        xs = [r.concurrency for r in sel]
        modes = "+".join(sorted({m for r in sel for m in r.modes.split("+") if m}))
        label = KIND_LABELS.get(kind, kind) + (f" (answered by: {modes})" if modes else "")
        (line,) = top.plot(xs, [r.qps for r in sel], marker="o", label=label)
        for r in sel:
            top.annotate(
                f"{r.qps:.0f}/s, {r.ratio_to_first:.2f}x",
                (r.concurrency, r.qps),
                textcoords="offset points",
                xytext=(4, 4 if i % 2 == 0 else -11),  # alternate kinds above and below: close lines stay legible
                fontsize=7,
                color=line.get_color(),
            )
        bottom.plot(xs, [100 * r.server_cpu for r in sel], marker="o", label=kind)
    top.set_ylabel("queries per second (log scale)")
    top.set_yscale("log")
    top.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    top.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    top.set_title("Throughput against concurrent clients (closed loop; queries/s, ratio to 1 client)")
    top.legend()
    top.grid(True, which="both", alpha=0.3)
    cores = os.cpu_count() or 1
    for c in range(1, cores + 1):  # what the host could give the server: one line per core
        bottom.axhline(100 * c, color="grey", linestyle=":", linewidth=1)
    bottom.set_ylim(0, max(100 * cores, 100 * max(r.server_cpu for r in rows)) * 1.08)
    bottom.set_ylabel(f"server CPU (%; {cores} cores = {100 * cores}%)")
    bottom.set_xlabel("concurrent clients")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(sorted({r.concurrency for r in rows}))
    bottom.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def write_sweep(rows: Sequence[SweepRow], out: Path, plot: bool = True) -> list[Path]:
    """The CSV, and the PNG unless `plot` is False."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONCURRENCY_CSV
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    files = [path]
    if plot:
        fig = sweep_figure(rows)
        png = out / CONCURRENCY_PNG
        fig.savefig(png, dpi=110)
        files.append(png)
    return files
