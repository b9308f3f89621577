"""Throughput of the service with 1 and 2 uvicorn workers and different torch / FAISS thread counts (not a test).

    .venv/bin/python -m benchmarks.bench_throughput --home /tmp/bench-home --space rare \
        --configs 1x1x1,1x2x1,2x1x1,2x2x1,1x1x2,2x1x2 --concurrency 4 --duration 8 --rounds 3 \
        --out var/bench/throughput.json

A configuration WxTxF is W uvicorn workers (`uvicorn service.app:create_app --factory --workers W`), T torch
intra-op threads per worker (PRUNECASCADE_TORCH_THREADS) and F OpenMP threads for FAISS (OMP_NUM_THREADS;
FAISS only runs for queries by example). Every configuration's server is started once, on its own loopback
port, and stays idle while another is measured; rounds visit the configurations in a rotated order, and each
configuration's throughput is reported as the median over rounds of its ratio to the first configuration in
the same round. The result cache is off and every request has its own seed. The load is closed-loop:
`--concurrency` client threads, each with one keep-alive connection, send the next query when the last one
returned; every run is bounded by `--duration` and `--max-requests`.
Every client alternates label queries (the service's default cascade, k=20) and queries by 2 example items
(256 candidate clusters), so the mix is half and half by count; latency is also reported per kind.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_HOME, RARE_SPACE, dump_json, median, percentile, serve

__all__ = ["main", "load", "parse_config"]


def parse_config(text: str) -> tuple[int, int, int]:
    w, t, f = (int(v) for v in text.split("x"))
    return w, t, f


def _bodies(home: Path, space: str, count: int, k: int) -> list[dict]:
    """Label queries over every label and queries by example drawn from the space's own items, alternating."""
    from cascade.space import Space

    sp = Space.load(home / "spaces" / space)
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(count):
        if i % 2 == 0:
            bodies.append({"target": {"label": int(i // 2 % sp.num_classes)}, "k": k, "seed": i})
        else:
            rows = rng.choice(sp.num_items, 2, replace=False)
            bodies.append({"target": {"examples": sp.features[rows].round(5).tolist()}, "k": k, "seed": i})
    return bodies


def load(url: str, bodies: list[dict], concurrency: int, duration: float, max_requests: int) -> dict:
    """Closed loop for `duration` seconds (or `max_requests`), returns completed requests per second."""
    import httpx

    latencies: list[float] = []
    by_kind: dict[str, list[float]] = {"label": [], "examples": []}
    errors = [0]
    lock = threading.Lock()
    sent = [0]
    seq = [0]
    stop_at = time.monotonic() + duration

    def worker(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30.0) as client:
            i = offset
            while time.monotonic() < stop_at:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                with lock:
                    seq[0] += 1
                    body = {**bodies[i % len(bodies)], "seed": seq[0]}  # never a repeated query
                t0 = time.perf_counter()
                try:
                    ok = client.post("/v1/query", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if ok:
                        latencies.append((time.perf_counter() - t0) * 1000)
                        by_kind["label" if "label" in body["target"] else "examples"].append(latencies[-1])
                    else:
                        errors[0] += 1
                i += 1  # every client alternates label and example queries

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(j * 7,)) for j in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return {
        "rps": len(latencies) / elapsed,
        "completed": len(latencies),
        "errors": errors[0],
        "p50_ms": median(latencies) if latencies else float("nan"),
        "p90_ms": percentile(latencies, 90) if latencies else float("nan"),
        **{f"{kind}_p50_ms": median(v) if v else float("nan") for kind, v in by_kind.items()},
        **{f"{kind}_count": len(v) for kind, v in by_kind.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=DEFAULT_HOME)
    p.add_argument("--space", default=RARE_SPACE)
    p.add_argument("--configs", default="1x1x1,2x1x1", help="comma-separated WORKERSxTORCHxFAISS threads")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop client threads")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per (configuration, round)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-requests", type=int, default=5000, help="per (configuration, round)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--port", type=int, default=18800, help="first port; one per configuration")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.configs.split(",")]
    bodies = _bodies(args.home, args.space, 200, args.k)
    runs: dict[str, list[dict]] = {c: [] for c in args.configs.split(",")}
    names = list(runs)
    log = Path("/tmp") / "bench_throughput_servers.log"
    with ExitStack() as stack:
        urls = {}
        for j, (name, (w, t, f)) in enumerate(zip(names, configs, strict=True)):
            urls[name] = stack.enter_context(serve(args.home, args.space, args.port + j, w, t, f, log=log))
            print(f"{name}: ready at {urls[name]}", flush=True)
        for name in names:  # warm-up: every worker's first requests
            load(urls[name], bodies, args.concurrency, 1.0, 200)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                runs[name].append(load(urls[name], bodies, args.concurrency, args.duration, args.max_requests))
                print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    base = names[0]
    summary = {}
    for name in names:
        ratios = [m["rps"] / b["rps"] for m, b in zip(runs[name], runs[base], strict=True)]
        summary[name] = {
            "workers_torch_faiss": name,
            "rps_median": median([m["rps"] for m in runs[name]]),
            "ratio_to_first_median": median(ratios),
            "p50_ms_median": median([m["p50_ms"] for m in runs[name]]),
            "p90_ms_median": median([m["p90_ms"] for m in runs[name]]),
            "label_p50_ms_median": median([m["label_p50_ms"] for m in runs[name]]),
            "examples_p50_ms_median": median([m["examples_p50_ms"] for m in runs[name]]),
            "errors": sum(m["errors"] for m in runs[name]),
        }
    out = {"space": args.space, "concurrency": args.concurrency, "duration": args.duration, "rounds": args.rounds}
    out |= {"summary": summary, "runs": runs}
    print(
        f"| workers x torch x faiss threads | req/s (median) | ratio to {base} | p50 ms | p90 ms | "
        "label p50 ms | example p50 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(
            f"| {name} | {s['rps_median']:.1f} | {s['ratio_to_first_median']:.2f}x | {s['p50_ms_median']:.1f} | "
            f"{s['p90_ms_median']:.1f} | {s['label_p50_ms_median']:.1f} | {s['examples_p50_ms_median']:.1f} | "
            f"{s['errors']} |"
        )
    if args.out:
        dump_json(args.out, out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
