"""The fixed per-request cost of the HTTP service (not a test): HTTP time minus the server's own `latency_ms`.

    .venv/bin/python -m benchmarks.bench_overhead --home /tmp/bench-home --space big --queries 300
    # the same queries, interleaved, against another checkout of the code (e.g. a `git worktree` of HEAD):
    .venv/bin/python -m benchmarks.bench_overhead --home /tmp/bench-home --space big --queries 300 \\
        --compare-tree /tmp/wt-http-before

Cheap queries (by one example item over `--candidates` clusters) make the fixed cost visible. For every query
the script records, per server, `HTTP ms - latency_ms` (the median of these per-query differences, not the
difference of two medians) through two clients on their own keep-alive connections: httpx (what
`bench_http` uses) and the standard library's `http.client` (a much lighter client, so the difference between
the two is the Python client's own share). It also times `GET /healthz` (no body, no model) through both.
With `--compare-tree`, a second server runs the code of that tree and every query goes to both servers back to
back, alternating which goes first, so both see the same machine load; the script prints the differences of
the medians and the median of the per-query differences (`paired_median_difference_ms`).
One uvicorn worker per server, torch threads 1, result cache off, log level warning, as in `bench_http`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from benchmarks.common import BIG_SPACE, DEFAULT_HOME, dump_json, load_snapshot_from, median, percentile, serve

__all__ = ["main", "measure"]


class _Probe:
    """One server, two keep-alive clients; collects per-query overheads."""

    def __init__(self, url: str, port: int) -> None:
        import httpx

        self.httpx = httpx.Client(base_url=url, timeout=30.0)
        self.stdlib = http.client.HTTPConnection("127.0.0.1", port, timeout=30.0)
        self.rows: dict[str, list[float]] = {
            k: [] for k in ("httpx_over", "stdlib_over", "server_ms", "httpx_ms", "httpx_health", "stdlib_health")
        }

    def close(self) -> None:
        self.httpx.close()
        self.stdlib.close()

    def _stdlib(self, method: str, path: str, body: bytes | None = None) -> bytes:
        headers = {"content-type": "application/json"} if body is not None else {}
        self.stdlib.request(method, path, body=body, headers=headers)
        response = self.stdlib.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
        return data

    def run(self, body: dict, record: bool) -> list[int]:
        t0 = time.perf_counter()
        response = self.httpx.post("/v1/query", json=body)
        response.raise_for_status()
        payload = response.json()
        t1 = t2 = time.perf_counter()  # the JSON encoding and decoding are timed for both clients
        payload2 = json.loads(self._stdlib("POST", "/v1/query", json.dumps(body).encode()))
        t3 = time.perf_counter()
        t4 = time.perf_counter()
        self.httpx.get("/healthz").raise_for_status()
        t5 = time.perf_counter()
        self._stdlib("GET", "/healthz")
        t6 = time.perf_counter()
        if record:
            r = self.rows
            r["httpx_over"].append((t1 - t0) * 1000 - payload["latency_ms"])
            r["stdlib_over"].append((t3 - t2) * 1000 - payload2["latency_ms"])
            r["server_ms"].append(payload["latency_ms"])
            r["httpx_ms"].append((t1 - t0) * 1000)
            r["httpx_health"].append((t5 - t4) * 1000)
            r["stdlib_health"].append((t6 - t5) * 1000)
        ids, ids2 = [c["cluster_id"] for c in payload["clusters"]], [c["cluster_id"] for c in payload2["clusters"]]
        if ids != ids2:
            raise AssertionError("two clients, same query and seed, different answers")
        return ids

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.rows.items():
            out[f"{k}_p50"] = median(v)
            out[f"{k}_p90"] = percentile(v, 90)
        return out


def measure(
    home: Path, space: str, queries: int, candidates: int, k: int, port: int, compare_tree: Path | None
) -> dict:
    snap = load_snapshot_from(home, space)
    rng = np.random.default_rng(0)
    examples = snap.space.features[rng.choice(snap.space.num_items, max(queries, 1))].round(5)
    del snap
    here = Path(__file__).resolve().parents[1]
    trees = {"this": here} | ({"compare": compare_tree.resolve()} if compare_tree else {})
    with ExitStack() as stack:
        probes: dict[str, _Probe] = {}
        for j, (name, tree) in enumerate(trees.items()):
            url = stack.enter_context(serve(home, space, port + j, tree=tree))
            probes[name] = _Probe(url, port + j)
            stack.callback(probes[name].close)
        names = list(probes)
        for i in range(-5, queries):  # 5 warm-up queries per server, with seeds the measured ones do not use
            ex = examples[i % len(examples)][None, :]
            seed = i if i >= 0 else 10**9 - i
            body = {"target": {"examples": ex.tolist()}, "k": k, "seed": seed, "candidates": candidates}
            order = names if i % 2 == 0 else names[::-1]
            answers = [probes[n].run(body, record=i >= 0) for n in order]
            if any(a != answers[0] for a in answers):
                raise AssertionError("the two code trees disagree on the same query and seed")
    out: dict = {
        "space": space,
        "queries": queries,
        "query_kind": f"by example, {candidates} candidate clusters, k={k}",
        "trees": {n: str(t) for n, t in trees.items()},
    }
    for n, p in probes.items():
        out[n] = p.summary()
    if "compare" in out:
        out["this_minus_compare_ms"] = {
            key: out["this"][key] - out["compare"][key] for key in out["this"] if key.endswith("_p50")
        }
        # The same query on both servers, back to back: the median of the per-query differences.
        this, other = probes["this"].rows, probes["compare"].rows
        out["paired_median_difference_ms"] = {
            key: median([a - b for a, b in zip(this[key], other[key], strict=True)]) for key in this
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=DEFAULT_HOME)
    p.add_argument("--space", default=BIG_SPACE)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--port", type=int, default=18761, help="this tree's server; the compared tree's is port + 1")
    p.add_argument("--compare-tree", type=Path, help="another checkout whose service runs side by side")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = measure(args.home, args.space, args.queries, args.candidates, args.k, args.port, args.compare_tree)
    print(json.dumps(out, indent=2))
    if args.out:
        dump_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
