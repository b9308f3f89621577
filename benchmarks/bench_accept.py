"""How a burst of keep-alive connections spreads over uvicorn's worker processes (not a test).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_accept --home /work/homes/h2c \
        --connections 2,8 --tries 10 [--loop asyncio]

A server of this checkout (`benchmarks.bench_concurrency.start_server`, on a copy of the home) with `--workers`
processes; each try opens C connections at once from C threads (as the load tester's clients and a load
balancer's pool open them), sends one query by example on each, and counts the established connections each
worker process holds (from /proc/net/tcp and the workers' file descriptors), then closes them. `--loop asyncio`:
uvicorn's own loop instead of `service.accept.BalancedAcceptLoop` (what `prunecascade serve --workers N` runs).
Prints, per C, how often each split (connections per worker, largest first) occurred.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.bench_concurrency import query_bodies, start_server
from service.loadtest.process_tree import descendants

__all__ = ["main", "established_per_process"]


def established_per_process(pids: list[int], port: int) -> list[int]:
    """Established TCP connections on local `port` held by each of `pids`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f[9])
    counts = []
    for pid in pids:
        n = 0
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            fds = []
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            n += target.startswith("socket:[") and target[8:-1] in inodes
        counts.append(n)
    return counts


def _burst(port: int, body: bytes, clients: int) -> list[http.client.HTTPConnection]:
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(clients)]
    gate = threading.Barrier(clients)

    def go(c: http.client.HTTPConnection) -> None:
        gate.wait()
        c.request("POST", "/v1/query", body=body, headers={"content-type": "application/json"})
        c.getresponse().read()

    threads = [threading.Thread(target=go, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return conns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--space", default="default")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", default="2,8")
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--loop", choices=("balanced", "asyncio"), default="balanced")
    p.add_argument("--port", type=int, default=18990)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-accept-"))
    env = {"LAUNCHER": "uvicorn", "UVICORN_LOOP": "asyncio"} if args.loop == "asyncio" else {}
    try:
        home = work / "home"
        shutil.copytree(args.home, home, ignore=shutil.ignore_patterns("data", "item_inputs"))
        with start_server(home, args.space, args.port, args.workers, env) as (_, pid):
            example = query_bodies(home, args.space, 10)["examples"][0]
            body = json.dumps({**example, "seed": 1}).encode()
            workers = [w for w in descendants(pid) if w != pid]
            print(f"{args.workers} workers, loop {args.loop}", flush=True)
            for clients in [int(c) for c in args.connections.split(",")]:
                splits: collections.Counter = collections.Counter()
                for _ in range(args.tries):
                    conns = _burst(args.port, body, clients)
                    held = sorted((n for n in established_per_process(workers, args.port) if n), reverse=True)
                    splits[tuple(held)] += 1
                    for c in conns:
                        c.close()
                    time.sleep(0.3)
                text = ", ".join(f"{'/'.join(map(str, s))}: {n}" for s, n in splits.most_common())
                print(f"{clients} connections at once, {args.tries} tries: {text}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
