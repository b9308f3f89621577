"""Bounded query load against a deployment's load balancer, with an optional fault injected mid-load.

Used by deploy/compose-check.sh: it sends a fixed number of distinct label queries (a fresh `seed` each, and
`"mode": "cascade"` so that every query runs the models rather than the exact table or the cache) at a
constant rate in open loop, runs `--fault-cmd` once `--fault-at` seconds in
(for example `docker kill` of one replica), and prints one JSON summary: how many queries failed and why,
latency percentiles, and the latencies of the queries sent around the fault. Loopback URLs only; the number
of requests, the per-request timeout and the total run time are all capped, so it always stops by itself.

    python deploy/compose_load.py --url http://127.0.0.1:8080 --requests 600 --rate 20 \
        --fault-at 10 --fault-cmd 'docker kill -s KILL prunecascade_api-1_1'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from service.loadtest.target import check_target

__all__ = ["Outcome", "Summary", "main", "run_load", "summarise"]

MAX_REQUESTS = 20_000
MAX_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """One query: when it was scheduled (seconds after the start), how long it took, and what went wrong."""

    sent_s: float
    latency_s: float
    error: str | None  # None: a 200 with k clusters (from the mode asked for); else "http 502", "ReadTimeout", ...


@dataclass
class Summary:
    requests: int
    ok: int
    failed: int
    errors: dict[str, int]
    latency_ms: dict[str, float]
    fault: dict[str, Any] | None
    around_fault: dict[str, Any] | None
    wall_s: float
    failed_at_s: list[float] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _latencies_ms(outcomes: list[Outcome]) -> dict[str, float]:
    lat = [o.latency_s * 1000 for o in outcomes]
    return {
        "p50": round(_percentile(lat, 0.50), 1),
        "p95": round(_percentile(lat, 0.95), 1),
        "p99": round(_percentile(lat, 0.99), 1),
        "max": round(max(lat, default=float("nan")), 1),
    }


def summarise(outcomes: list[Outcome], fault: dict[str, Any] | None, wall_s: float, window_s: float = 5.0) -> Summary:
    """Counts and percentiles; `around_fault` covers the queries sent in [fault, fault + window_s)."""
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            errors[o.error] = errors.get(o.error, 0) + 1
    failed = sum(errors.values())
    around = None
    if fault is not None:
        near = [o for o in outcomes if fault["at_s"] <= o.sent_s < fault["at_s"] + window_s]
        around = {"window_s": window_s, "requests": len(near), "latency_ms": _latencies_ms(near)}
    return Summary(
        requests=len(outcomes),
        ok=len(outcomes) - failed,
        failed=failed,
        errors=errors,
        latency_ms=_latencies_ms(outcomes),
        fault=fault,
        around_fault=around,
        wall_s=round(wall_s, 2),
        failed_at_s=sorted(round(o.sent_s, 2) for o in outcomes if o.error is not None),
    )


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], start: float, at: float) -> Outcome:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    try:
        resp = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        return Outcome(at, time.perf_counter() - start - at, type(exc).__name__)
    latency = time.perf_counter() - start - at
    if resp.status_code != 200:
        return Outcome(at, latency, f"http {resp.status_code}")
    try:
        answer = resp.json()
        ok = len(answer["clusters"]) == body["k"] and answer.get("mode") == body.get("mode", answer.get("mode"))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    return Outcome(at, latency, None if ok else "bad body")


async def _fault(cmd: str, start: float, at: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    fired = time.perf_counter() - start
    proc = await asyncio.create_subprocess_exec(
        *shlex.split(cmd), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    return {"cmd": cmd, "at_s": round(fired, 2), "rc": proc.returncode, "output": out.decode().strip()[-200:]}


async def run_load(
    base_url: str,
    requests: int,
    rate: float,
    timeout_s: float,
    k: int,
    labels: int,
    fault_at: float | None,
    fault_cmd: str | None,
    seed: int,
    mode: str | None = "cascade",
) -> Summary:
    """Open loop: query i is sent at i / rate seconds, whatever the earlier ones are doing."""
    rng = random.Random(seed)
    url = base_url.rstrip("/") + "/v1/query"
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        bodies = [{"target": {"label": rng.randrange(labels)}, "k": k, "seed": seed + i} for i in range(requests)]
        if mode:
            bodies = [{**body, "mode": mode} for body in bodies]
        tasks = [_one(client, url, body, start, i / rate) for i, body in enumerate(bodies)]
        fault_task = asyncio.ensure_future(_fault(fault_cmd, start, fault_at)) if fault_cmd and fault_at else None
        outcomes = await asyncio.gather(*tasks)
        fault = await fault_task if fault_task is not None else None
    return summarise(list(outcomes), fault, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the load balancer (loopback only)")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--rate", type=float, default=20.0, help="queries per second, open loop")
    p.add_argument("--timeout", type=float, default=15.0, help="per-query timeout in seconds")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--labels", type=int, default=10, help="query labels 0..labels-1")
    p.add_argument("--fault-at", type=float, default=None, help="seconds after the start")
    p.add_argument("--fault-cmd", default=None, help="command run once at --fault-at (no shell)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mode", default="cascade", help='the query\'s "mode" ("" leaves it out: the service default)')
    args = p.parse_args(argv)
    check_target(args.url, allow_remote=False)
    if not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--requests must be in 1..{MAX_REQUESTS}")
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        p.error(f"--timeout must be in (0, {MAX_TIMEOUT_S}]")
    if args.rate <= 0:
        p.error("--rate must be positive")
    # The whole run is bounded: the last send, its timeout and the fault command's 30 s, plus slack.
    budget = args.requests / args.rate + args.timeout + 60
    summary = asyncio.run(
        asyncio.wait_for(
            run_load(
                args.url,
                args.requests,
                args.rate,
                args.timeout,
                args.k,
                args.labels,
                args.fault_at,
                args.fault_cmd,
                args.seed,
                args.mode or None,
            ),
            timeout=budget,
        )
    )
    json.dump(summary.__dict__, sys.stdout, indent=2)
    print()
    return 0 if summary.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
