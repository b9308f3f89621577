"""Throughput against concurrency over HTTP, with the server's CPU, and an open-loop latency check (not a test).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_concurrency \
        --home /work/home-default --clients 1,2,4,8 --duration 6 --rounds 2 --out var/bench/concurrency.json

Each server (`--server`, default one of this checkout) is a real uvicorn serving its own copy of the home (the
server writes the exact table beside the space, so the shared
home is never served directly), result cache off, on 127.0.0.1; with several workers, accepting connections as
`prunecascade serve --workers N` does (`service/accept.py`). Closed loop: C client threads in this process,
each with its own keep-alive connection (`http.client`, lighter than httpx, so the clients take less of the
2 cores; opened, and answered a `GET /healthz` by a worker, before the clock starts), send the next query as soon
as the last one returned. The clients' own CPU (this process) is reported beside the server's: on a 2-core
machine they compete with the server for the same cores. Three kinds of query, each measured at every
C in every round, the rounds visiting (kind, C) in a rotated order:

- `examples`: a shipped held-out query by example (`queries.npz`, never an item), the space's default
  cascade, k = 10, a new seed per request;
- `faiss`: the same queries with `"stages": []` (stage 0 alone);
- `label`: `{"target": {"label": L}}`, answered from the exact table (the script waits until it is built).

Server CPU is the change of utime + stime in /proc/PID/stat of the server this script started and of its
descendants (uvicorn's workers), over the run's wall time: 100% is one core. The mean batch (queries by example
per batch of `cascade.batcher`) sums the batch counters of every worker's /metrics. The ratio columns divide by the
1-client throughput of the same kind in the same round (median over rounds).

Open loop (`--open-loop-factor`, default 1.5): after the closed-loop rounds, queries by example are sent on a
fixed schedule at that multiple of the 1-client rate measured in this run (or at `--open-loop-rate`, the same
for every server), from a pool of sender threads,
latency counted from each request's scheduled time (so queueing in the client counts); its p99 is compared
with the 1-client closed-loop p99 of the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchmarks.common import dump_json, median, percentile, uvicorn_process
from service.loadtest.process_tree import descendants, tree_cpu_seconds

__all__ = ["main", "closed_loop", "open_loop", "server_cpu_seconds", "start_server", "query_bodies"]

KINDS = ("examples", "faiss", "label")


def server_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its descendants (the server and its workers), in seconds."""
    return tree_cpu_seconds(pid)


def memory_kib(pid: int) -> dict[str, int]:
    """Rss, Pss and private (Private_Clean + Private_Dirty) summed over `pid` and its descendants (kB), from
    /proc/PID/smaps_rollup: Pss shares each shared page among the processes that map it."""
    out = {"rss": 0, "pss": 0, "private": 0}
    for p in descendants(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split()
            if parts[0] == "Rss:":
                out["rss"] += int(parts[1])
            elif parts[0] == "Pss:":
                out["pss"] += int(parts[1])
            elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                out["private"] += int(parts[1])
    return out


def _has(tree, module: str) -> bool:
    """Whether the checkout the server runs (this one when None) has `service/<module>`."""
    return (Path(tree) if tree else Path(__file__).resolve().parents[1]).joinpath("service", module).exists()


@contextmanager
def start_server(
    home: Path, space: str, port: int, workers: int = 1, env: dict[str, str] | None = None, log=None, cwd=None
):
    """uvicorn on 127.0.0.1 (result cache off), stopped by its own pid; yields (url, pid). Several workers run as
    `prunecascade serve --workers N` runs them, forked from one parent (in a checkout with service/workers.py),
    with `service.accept.BalancedAcceptLoop`. `env` may set `LAUNCHER=uvicorn` for uvicorn's own spawned workers,
    and then `UVICORN_LOOP=asyncio` for uvicorn's own loop; `FRONT=nginx` runs N one-worker replicas behind
    deploy/nginx.conf's `least_conn` instead (`benchmarks/balanced_replicas.py`)."""
    env = dict(env or {})
    front = env.pop("FRONT", None)
    forked = workers > 1 and env.pop("LAUNCHER", "serve") == "serve" and _has(cwd, "workers.py")
    command = None
    if front == "nginx":  # N one-worker replicas behind deploy/nginx.conf's least_conn
        command = [sys.executable, "-m", "benchmarks.balanced_replicas", "--port", str(port)]
        command += ["--replicas", str(workers), "--replica-port", str(port + 100)]
    elif front is not None:
        raise ValueError(f"unknown FRONT={front!r} (known: nginx)")
    environ = {
        **os.environ,
        **(
            {"UVICORN_LOOP": "service.accept:BalancedAcceptLoop"}
            if workers > 1 and front is None and _has(cwd, "accept.py")
            else {}
        ),
        "PRUNECASCADE_HOME": str(home),
        "PRUNECASCADE_SPACE": space,
        "PRUNECASCADE_LOG_LEVEL": "warning",
        "PRUNECASCADE_CACHE_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    log = log or subprocess.DEVNULL
    with uvicorn_process(
        port, workers, environ, log, cwd=cwd, ready_per_worker=20, forked=forked, command=command
    ) as server:
        yield server


def wait_exact(url: str, timeout_s: float = 300.0) -> None:
    """Until `GET /v1/space` says the exact table is ready (label queries are then table lookups)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = httpx.get(f"{url}/v1/space", timeout=5.0).json().get("exact", {}).get("state")
        if state == "ready":
            return
        time.sleep(0.5)
    raise TimeoutError("the exact table was not built in time")


def query_bodies(home: Path, space: str, k: int) -> dict[str, list[dict]]:
    """Request bodies per kind (the seed of a query by example is set per request)."""
    from cascade.queries import QuerySet
    from cascade.space import Space

    qs = QuerySet.load(home / "spaces" / space)
    assert qs is not None, "the space ships no held-out queries"
    sp = Space.load(home / "spaces" / space)
    examples = [{"target": {"examples": [row.tolist()]}, "k": k} for row in qs.x]
    return {
        "examples": examples,
        "faiss": [{**b, "stages": []} for b in examples],
        "label": [{"target": {"label": int(label)}, "k": k} for label in sp.labels_known],
    }


class _Client:
    """One keep-alive connection, opened (and accepted by a worker: a `GET /healthz` answered) before it is timed."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60.0)
        self.request("GET", "/healthz", None)

    def request(self, method: str, path: str, body: bytes | None) -> int:
        try:
            headers = {"content-type": "application/json"} if body is not None else {}
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            self.conn.close()
            return 0

    def post(self, path: str, body: bytes) -> int:
        return self.request("POST", path, body)


def _metrics_once(port: int) -> dict[str, float]:
    """The counters this script reads from one answer of /metrics (a new connection: any worker may answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
    except (OSError, http.client.HTTPException):
        return {}
    finally:
        conn.close()
    wanted = ("prunecascade_batches_total", "prunecascade_batched_queries_total", "process_start_time_seconds")
    values = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    if response.status != 200 or values["process_start_time_seconds"] <= 0:
        return {}  # not a worker's metrics (an error answer): it must not count as a worker
    return values


def batch_counters(port: int, workers: int = 1, tries: int = 60) -> tuple[float, float]:
    """(batches, batched queries) from the server's /metrics (0 without batching), summed over its workers: with
    several, /metrics is asked on new connections until `workers` different processes (by their start time) have
    answered, at most `tries` times; NaN when fewer did (the mean batch is then not reported)."""
    seen: dict[float, dict[str, float]] = {}
    for _ in range(tries if workers > 1 else 1):
        values = _metrics_once(port)
        if values:
            seen[values["process_start_time_seconds"]] = values
        if len(seen) >= workers:
            break
    if workers > 1 and len(seen) < workers:  # (or two workers started in the same clock tick: not told apart)
        print(f"warning: /metrics answered by {len(seen)} of {workers} workers: no mean batch", flush=True)
        return float("nan"), float("nan")
    return (
        sum(v["prunecascade_batches_total"] for v in seen.values()),
        sum(v["prunecascade_batched_queries_total"] for v in seen.values()),
    )


def _encode(body: dict, seed: int) -> bytes:
    return json.dumps({**body, "seed": seed}).encode() if "examples" in body["target"] else json.dumps(body).encode()


def closed_loop(
    port: int, pid: int, bodies: list[dict], clients: int, duration: float, path: str = "/v1/query", workers: int = 1
) -> dict:
    """`clients` threads, each on its own keep-alive connection (opened before the clock starts), for `duration`
    seconds; `workers`: the server's worker processes (their batch counters are summed)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    counter = iter(range(10**9))
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(j: int) -> None:
        client = _Client(port)
        start_gate.wait()
        while time.monotonic() < stop_at[0]:
            with lock:
                i = next(counter)
            body = _encode(bodies[i % len(bodies)], i)
            t0 = time.perf_counter()
            status = client.post(path, body)
            if status == 200:
                latencies[j].append((time.perf_counter() - t0) * 1000.0)
            else:
                errors[j] += 1
        client.conn.close()

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(clients)]
    for t in threads:
        t.start()
    batches0 = batch_counters(port, workers)
    cpu0, wall0, own0 = server_cpu_seconds(pid), time.monotonic(), time.process_time()
    stop_at[0] = wall0 + duration
    start_gate.wait()
    for t in threads:
        t.join()
    wall = time.monotonic() - wall0
    cpu = server_cpu_seconds(pid) - cpu0
    own = time.process_time() - own0
    batches1 = batch_counters(port, workers)
    flat = [v for per in latencies for v in per]
    return {
        "clients": clients,
        "qps": len(flat) / wall,
        "completed": len(flat),
        "errors": sum(errors),
        "p50_ms": median(flat) if flat else float("nan"),
        "p99_ms": percentile(flat, 99) if flat else float("nan"),
        "server_cpu": cpu / wall,
        "client_cpu": own / wall,
        "cpu_ms_per_query": 1000.0 * cpu / len(flat) if flat else float("nan"),
        "mean_batch": (batches1[1] - batches0[1]) / (batches1[0] - batches0[0])
        if batches1[0] > batches0[0]
        else (float("nan") if math.isnan(batches0[0] + batches1[0]) else 1.0),
    }


def open_loop(port: int, pid: int, bodies: list[dict], rate: float, duration: float, senders: int = 64) -> dict:
    """Requests at fixed intervals (`rate` per second) for `duration` s; latency from the scheduled time."""
    count = max(1, int(rate * duration))
    jobs: queue.Queue = queue.Queue()
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()

    ready = threading.Barrier(senders + 1)

    def sender() -> None:
        client = _Client(port)
        ready.wait()
        while True:
            job = jobs.get()
            if job is None:
                break
            i, scheduled = job
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            status = client.post("/v1/query", _encode(bodies[i % len(bodies)], 10**6 + i))
            done = time.perf_counter()
            with lock:
                statuses.append(status)
                if status == 200:
                    latencies.append((done - scheduled) * 1000.0)
        client.conn.close()

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    ready.wait()  # every sender's connection open and accepted before the schedule starts
    cpu0, own0 = server_cpu_seconds(pid), time.process_time()
    start = time.perf_counter() + 0.2
    for i in range(count):  # handed out in order of their scheduled time, each to the next free sender
        scheduled = start + i / rate
        while time.perf_counter() < scheduled - 0.002:
            time.sleep(0.0005)
        jobs.put((i, scheduled))
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "rate": rate,
        "sent": count,
        "ok": len(latencies),
        "errors": sum(1 for s in statuses if s != 200),
        "p50_ms": median(latencies) if latencies else float("nan"),
        "p99_ms": percentile(latencies, 99) if latencies else float("nan"),
        "server_cpu": (server_cpu_seconds(pid) - cpu0) / wall,
        "client_cpu": (time.process_time() - own0) / wall,
    }


def parse_server(text: str) -> dict:
    """`NAME[,workers=N][,tree=PATH][,ENV=VALUE...]`: a server to measure (`tree`: run that checkout's code)."""
    name, *rest = text.split(",")
    spec: dict = {"name": name, "workers": 1, "tree": None, "env": {}}
    for item in rest:
        key, _, value = item.partition("=")
        if key == "workers":
            spec["workers"] = int(value)
        elif key == "tree":
            spec["tree"] = value
        else:
            spec["env"][key] = value
    return spec


def _summary(runs: dict[str, dict[int, list[dict]]], clients: list[int]) -> dict[str, list[dict]]:
    summary: dict[str, list[dict]] = {}
    for kind, per in runs.items():
        rows = []
        for c in clients:
            ms = per[c]
            ratios = [m["qps"] / b["qps"] for m, b in zip(ms, per[clients[0]], strict=True)]
            rows.append(
                {
                    "clients": c,
                    "qps": median([m["qps"] for m in ms]),
                    "ratio_to_1_client": median(ratios),
                    "p50_ms": median([m["p50_ms"] for m in ms]),
                    "p99_ms": median([m["p99_ms"] for m in ms]),
                    "server_cpu": median([m["server_cpu"] for m in ms]),
                    "client_cpu": median([m["client_cpu"] for m in ms]),
                    "cpu_ms_per_query": median([m["cpu_ms_per_query"] for m in ms]),
                    "mean_batch": median([m["mean_batch"] for m in ms]),
                    "errors": sum(m["errors"] for m in ms),
                }
            )
        summary[kind] = rows
    return summary


def run(args: argparse.Namespace) -> dict:
    """Every server runs at once (each on its own port and its own copy of the home); each round measures
    every (server, kind, clients) cell, in a rotated order, so all servers see the same machine load."""
    clients = [int(c) for c in args.clients.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    servers = [parse_server(t) for t in (args.server or ["default"])]
    work = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    out: dict = {"clients": clients, "duration": args.duration, "rounds": args.rounds, "servers": {}}
    runs = {s["name"]: {k: {c: [] for c in clients} for k in kinds} for s in servers}
    try:
        with ExitStack() as stack:
            live = {}
            workers: dict[str, int] = {}
            for j, spec in enumerate(servers):
                home = work / f"home-{j}"
                shutil.copytree(args.home, home, ignore=shutil.ignore_patterns("data", "item_inputs"))
                log = stack.enter_context(open(work / f"server-{j}.log", "wb"))
                env = {**spec["env"], **({"PYTHONPATH": spec["tree"]} if spec["tree"] else {})}
                url, pid = stack.enter_context(
                    start_server(home, args.space, args.port + j, spec["workers"], env, log, cwd=spec["tree"])
                )
                live[spec["name"]] = (args.port + j, pid, url)
                workers[spec["name"]] = spec["workers"]
                print(f"{spec['name']}: ready at {url} (pid {pid})", flush=True)
            bodies = query_bodies(work / "home-0", args.space, args.k)
            for name, (port, pid, url) in live.items():
                if "label" in kinds:
                    wait_exact(url)
                for kind in kinds:  # warm-up: every worker's first queries
                    closed_loop(port, pid, bodies[kind], max(clients), 1.0, workers=workers[name])
                out["servers"][name] = {"memory_kib_after_warmup": memory_kib(pid)}
            cells = [(name, kind, c) for name in live for kind in kinds for c in clients]
            for r in range(args.rounds):
                order = cells[r % len(cells) :] + cells[: r % len(cells)]
                for name, kind, c in order:
                    port, pid, _ = live[name]
                    m = closed_loop(port, pid, bodies[kind], c, args.duration, workers=workers[name])
                    runs[name][kind][c].append(m)
                    print(f"round {r} {name} {kind} x{c}: {json.dumps(m)}", flush=True)
            if args.open_loop_factor > 0 and "examples" in kinds:
                for name, (port, pid, _) in live.items():
                    base = median([m["qps"] for m in runs[name]["examples"][clients[0]]])
                    rate = args.open_loop_rate or args.open_loop_factor * base
                    o = open_loop(port, pid, bodies["examples"], rate, args.open_loop_duration)
                    o["factor"] = rate / base
                    o["closed_1_client_p99_ms"] = median([m["p99_ms"] for m in runs[name]["examples"][clients[0]]])
                    out["servers"][name]["open_loop"] = o
                    print(f"{name} open loop: {json.dumps(o)}", flush=True)
            for name, (_, pid, _) in live.items():
                out["servers"][name]["memory_kib_end"] = memory_kib(pid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for spec in servers:
        name = spec["name"]
        out["servers"][name] |= {"spec": spec, "summary": _summary(runs[name], clients)}
        out["servers"][name]["runs"] = {k: {str(c): v for c, v in per.items()} for k, per in runs[name].items()}
    return out


def print_table(out: dict) -> None:
    for name, server in out["servers"].items():
        summary = server["summary"]
        kinds = list(summary)
        spec = server["spec"]
        print(f"\n{name}: {spec['workers']} worker(s), env {spec['env']}, tree {spec['tree'] or 'this one'}")
        head = " | ".join(f"{k} q/s (ratio) | {k} p50 / p99 ms | {k} server CPU (CPU ms per query)" for k in kinds)
        print(f"| clients | {head} | examples: mean batch | examples: clients' CPU |")
        print("|---|" + "---|---|---|" * len(kinds) + "---|---|")
        for i, c in enumerate(out["clients"]):
            cells = []
            for k in kinds:
                s = summary[k][i]
                cells.append(
                    f"{s['qps']:.1f} ({s['ratio_to_1_client']:.2f}x) | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} | "
                    f"{100 * s['server_cpu']:.0f}% ({s['cpu_ms_per_query']:.1f})"
                )
            batch = summary["examples"][i]["mean_batch"] if "examples" in summary else float("nan")
            own = summary["examples"][i]["client_cpu"] if "examples" in summary else float("nan")
            print(f"| {c} | " + " | ".join(cells) + f" | {batch:.2f} | {100 * own:.0f}% |")
        if "open_loop" in server:
            o = server["open_loop"]
            print(
                f"open loop at {o['factor']}x the 1-client rate ({o['rate']:.1f} q/s, {o['sent']} sent, "
                f"{o['errors']} errors): p50 {o['p50_ms']:.1f} ms, p99 {o['p99_ms']:.1f} ms = "
                f"{o['p99_ms'] / o['closed_1_client_p99_ms']:.2f}x the 1-client p99 "
                f"({o['closed_1_client_p99_ms']:.1f} ms); server CPU {100 * o['server_cpu']:.0f}%, "
                f"clients' CPU {100 * o.get('client_cpu', float('nan')):.0f}%"
            )
        mem = server.get("memory_kib_end", {})
        if mem:
            print(
                f"memory (server tree): RSS {mem['rss'] / 1024:.0f} MiB, PSS {mem['pss'] / 1024:.0f} MiB, "
                f"private {mem['private'] / 1024:.0f} MiB"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=Path("/work/home-default"))
    p.add_argument("--space", default="default")
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--duration", type=float, default=6.0, help="seconds per (kind, clients, round)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--server",
        action="append",
        help="NAME[,workers=N][,tree=PATH][,ENV=VALUE...] (repeatable; default: one server of this checkout)",
    )
    p.add_argument("--open-loop-factor", type=float, default=1.5)
    p.add_argument(
        "--open-loop-rate",
        type=float,
        help="queries per second of the open loop, the same for every server (default: the factor x each one's own "
        "1-client rate)",
    )
    p.add_argument("--open-loop-duration", type=float, default=10.0)
    p.add_argument("--port", type=int, default=18950)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = run(args)
    print_table(out)
    if args.out:
        dump_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
