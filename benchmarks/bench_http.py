"""HTTP overhead: the service's latency against the in-process engine on the same queries (not a test).

    .venv/bin/python -m benchmarks.bench_http --home /tmp/bench-home --space rare --queries 300 \
        --stages '[{"variant":"cnn-s25","samples":1,"keep":40},{"variant":"dense","samples":10}]' \
        --out var/bench/http_rare.json

One uvicorn worker (torch threads 1, the service default, result cache off) on 127.0.0.1; the client keeps one
connection open: httpx by default, or with `--client stdlib` the standard library's `http.client` (much less
Python per request: the difference between the two runs is the client's own share of the HTTP time).
`http_minus_server_p50_ms` is the median over queries of HTTP time minus the server's own `latency_ms` (the
fixed per-request cost: transport, framework, validation, JSON, client).
Each query runs in-process and then over HTTP, back to back, and every `--oracle-every`th query also runs the
dense exhaustive oracle in-process, so the HTTP wall-time ratio to the oracle comes from the same run.
Target: HTTP p50 <= 1.5 x in-process p50 + 2 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.common import (
    DEFAULT_HOME,
    RARE_SPACE,
    dump_json,
    load_snapshot_from,
    median,
    percentile,
    serve,
    set_threads,
)

__all__ = ["main", "measure"]

_JSON = {"content-type": "application/json"}


@contextmanager
def _client(kind: str, url: str, port: int) -> Iterator[Callable[[dict], dict]]:
    """`post(body) -> payload` over one keep-alive connection; the JSON encoding and decoding are part of it."""
    if kind == "stdlib":
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30.0)

        def post_stdlib(body: dict) -> dict:
            conn.request("POST", "/v1/query", body=json.dumps(body).encode(), headers=_JSON)
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
            return json.loads(data)

        try:
            yield post_stdlib
        finally:
            conn.close()
        return
    import httpx

    with httpx.Client(base_url=url, timeout=30.0) as client:

        def post_httpx(body: dict) -> dict:
            response = client.post("/v1/query", json=body)
            response.raise_for_status()
            return response.json()

        yield post_httpx


def measure(
    home: Path,
    space: str,
    queries: int,
    stages: list[dict] | None,
    port: int,
    oracle_every: int,
    max_seconds: float,
    candidates: int = 0,
    k_override: int | None = None,
    client_kind: str = "httpx",
) -> dict:
    """Interleaved in-process / HTTP pairs; the queries cycle through every label (rare space: the rare label),
    or with `candidates` > 0 are queries by one example item of the space over that many nearest clusters
    (small, cheap queries where the fixed per-request cost shows)."""
    from cascade.config import Stage
    from cascade.engine import dense_oracle
    from cascade.plan import Query, execute, plan_query, target_of

    set_threads(1)
    snap = load_snapshot_from(home, space)
    if "rare_label" in snap.space.meta:
        labels = [int(snap.space.meta["rare_label"])]
        k = int((snap.space.cluster_labels == labels[0]).sum())
    else:
        labels, k = list(range(snap.space.num_classes)), 10
    k = k_override or k
    stage_objs = tuple(Stage(**s) for s in stages) if stages else None
    extra = {"stages": stages} if stages else {}
    rng = np.random.default_rng(0)
    examples = snap.space.features[rng.choice(snap.space.num_items, max(queries, 1))].round(5)

    def query(i: int) -> tuple[dict, Query]:
        """The HTTP body and the in-process query for query i (the same query)."""
        if candidates:
            ex = examples[i % len(examples)][None, :]
            body = {"target": {"examples": ex.tolist()}, "k": k, "seed": i, "candidates": candidates, **extra}
            return body, Query(examples=ex, k=k, stages=stage_objs, candidates=candidates)
        label = labels[i % len(labels)]
        return {"target": {"label": label}, "k": k, "seed": i, **extra}, Query(label=label, k=k, stages=stage_objs)

    inproc, http, server_ms, oracle_ms = [], [], [], []
    with serve(home, space, port) as url, _client(client_kind, url, port) as post:
        for i in range(5):  # warm-up both paths, with seeds the measured queries do not use
            body, in_process = query(i)
            body["seed"] = 10**9 + i
            post(body)
            execute(plan_query(snap, in_process), 10**9 + i)
        deadline = time.monotonic() + max_seconds
        for i in range(queries):
            if time.monotonic() > deadline:
                break
            body, in_process = query(i)
            t0 = time.perf_counter()
            result = execute(plan_query(snap, in_process), i)  # no exact table given: the cascade
            t1 = time.perf_counter()
            payload = post(body)
            t2 = time.perf_counter()
            if [c["cluster_id"] for c in payload["clusters"]] != result.cluster_ids.tolist():
                raise AssertionError("the service and the engine disagree on the same query and seed")
            inproc.append((t1 - t0) * 1000)
            http.append((t2 - t1) * 1000)
            server_ms.append(payload["latency_ms"])
            if oracle_every and i % oracle_every == 0:
                t0 = time.perf_counter()
                dense_oracle(snap, target_of(snap, in_process), k)
                oracle_ms.append((time.perf_counter() - t0) * 1000)
    p50_in, p50_http = median(inproc), median(http)
    out = {
        "space": space,
        "items": snap.space.num_items,
        "k": k,
        "stages": stages or [s.model_dump() for s in snap.config.stages],
        "queries": len(inproc),
        "query_kind": f"by example, {candidates} candidate clusters" if candidates else "label",
        "inproc_p50_ms": p50_in,
        "inproc_p90_ms": percentile(inproc, 90),
        "http_p50_ms": p50_http,
        "http_p90_ms": percentile(http, 90),
        "server_reported_p50_ms": median(server_ms),
        "http_minus_server_p50_ms": median([h - s for h, s in zip(http, server_ms, strict=True)]),
        "client": client_kind,
        "http_over_inproc": p50_http / p50_in,
        "http_minus_inproc_ms": p50_http - p50_in,
        "target_ms": 1.5 * p50_in + 2.0,
        "meets_target": p50_http <= 1.5 * p50_in + 2.0,
    }
    if oracle_ms:
        out |= {
            "oracle_p50_ms": median(oracle_ms),
            "oracle_runs": len(oracle_ms),
            "wall_ratio_inproc": median(oracle_ms) / p50_in,
            "wall_ratio_http": median(oracle_ms) / p50_http,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=DEFAULT_HOME)
    p.add_argument("--space", default=RARE_SPACE, help="a space under HOME/spaces (rare, big, default)")
    p.add_argument("--queries", type=int, default=50, help="in-process/HTTP pairs")
    p.add_argument("--stages", help="JSON stage list sent with every query (default: the service's default)")
    p.add_argument("--port", type=int, default=18731)
    p.add_argument("--oracle-every", type=int, default=10, help="run the oracle every Nth query (0: never)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this")
    p.add_argument("--candidates", type=int, default=0, help="> 0: queries by example over this many clusters")
    p.add_argument("--k", type=int, help="clusters asked for (default: 10, or the rare label's cluster count)")
    p.add_argument("--client", choices=("httpx", "stdlib"), default="httpx", help="the HTTP client (see above)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    stages = json.loads(args.stages) if args.stages else None
    out = measure(
        args.home,
        args.space,
        args.queries,
        stages,
        args.port,
        args.oracle_every,
        args.max_seconds,
        args.candidates,
        args.k,
        args.client,
    )
    print(json.dumps(out, indent=2))
    if args.out:
        dump_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
