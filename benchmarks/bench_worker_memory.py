"""Memory of a server against its number of worker processes: forked from one parent (`prunecascade serve
--workers N`) or spawned by uvicorn, with the item cache in shared memory-mapped files or in each worker's own
memory (not a test).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_worker_memory \
        --home /work/home-default --workers 1,2,3 --out var/bench/worker_memory.json
    .venv/bin/python -m benchmarks.bench_worker_memory --report var/bench/worker_memory.json   # the tables again

For every setting (`SETTINGS`) and worker count one server (its own copy of the home) is started, warmed with a few
queries by example per worker, and measured from /proc: Pss, Rss and private memory summed over the server's process
tree (smaps_rollup), and, from each process's smaps, what the item-input files' mappings take (their Rss, Pss and
private pages). Pss charges a shared page to each process that maps it by its share, so the tree's Pss is the memory
the server really holds. Growth per extra worker is the slope between consecutive worker counts; the item cache's
size is the table's bytes (`GET /v1/space`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np

from benchmarks.bench_concurrency import closed_loop, memory_kib, query_bodies, start_server
from benchmarks.common import dump_json
from service.loadtest.process_tree import descendants

__all__ = ["main", "mapping_kib", "private_by_kind"]


def mapping_kib(pid: int, needle: str) -> dict[str, int]:
    """Rss, Pss and private kB of the mappings whose path contains `needle`, over `pid`'s process tree."""
    out = {"rss": 0, "pss": 0, "private": 0}
    for p in descendants(pid):
        try:
            lines = Path(f"/proc/{p}/smaps").read_text().splitlines()
        except OSError:
            continue
        inside = False
        for line in lines:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:  # a mapping's header line
                inside = len(parts) >= 6 and needle in parts[-1]
            elif inside and parts[0] == "Rss:":
                out["rss"] += int(parts[1])
            elif inside and parts[0] == "Pss:":
                out["pss"] += int(parts[1])
            elif inside and parts[0] in ("Private_Clean:", "Private_Dirty:"):
                out["private"] += int(parts[1])
    return out


def _kind(path: str) -> str:
    """What a mapping holds, by its path: the item cache, other files of the home, shared libraries, the heap,
    anonymous memory (where torch, numpy and glibc's other arenas allocate) and the rest."""
    if "item_inputs" in path:
        return "item_cache"
    if ".so" in path:
        return "libraries"
    if path == "[heap]":
        return "heap"
    if not path:
        return "anonymous"
    return "other_files" if path.startswith("/") else "other"


def private_by_kind(pid: int) -> list[dict[str, int]]:
    """Per process of `pid`'s tree (the supervisor first), its private kB (clean and dirty) by `_kind` of mapping:
    what that process alone holds, so where a worker's own memory goes; and its Rss by kind (`rss_` + kind), shared
    pages included."""
    rows = []
    for p in descendants(pid):
        try:
            lines = Path(f"/proc/{p}/smaps").read_text().splitlines()
        except OSError:
            continue
        kinds: dict[str, int] = {}
        kind = "other"
        for line in lines:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                kind = _kind(parts[5] if len(parts) >= 6 else "")
            elif parts and parts[0] in ("Private_Clean:", "Private_Dirty:"):
                kinds[kind] = kinds.get(kind, 0) + int(parts[1])
            elif parts and parts[0] == "Rss:":
                kinds[f"rss_{kind}"] = kinds.get(f"rss_{kind}", 0) + int(parts[1])
        rows.append({"pid": p, **kinds})
    return rows


SETTINGS: dict[str, dict[str, str]] = {
    # `prunecascade serve --workers N`: forked from one parent that imported the service and read the home; the item
    # cache in files
    "forked-mapped": {},
    # the same, each worker reading the home itself after the fork (as before `service/preload.py`)
    "forked-mapped-read-each": {"PRUNECASCADE_PRELOAD_HOME": "false"},
    # the same with glibc's allocator held to two arenas (it makes up to 8 per core, one per thread that allocates
    # while another holds an arena, and each keeps what its thread freed)
    "forked-mapped-arenas2": {"MALLOC_ARENA_MAX": "2"},
    # the parent caps the workers' arenas (`service/malloc_arenas.py`): one, or glibc's own number (8 per core)
    "forked-mapped-one-arena": {"PRUNECASCADE_MALLOC_ARENAS": "1"},
    "forked-mapped-glibc-arenas": {"PRUNECASCADE_MALLOC_ARENAS": "0"},
    # uvicorn's own `--workers N`: every worker a fresh interpreter that imports torch and the service again
    "spawned-mapped": {"LAUNCHER": "uvicorn"},
    "spawned-copies": {"LAUNCHER": "uvicorn", "PRUNECASCADE_ITEM_CACHE_FILES": "false"},
}


def _runs(rows: list[dict]) -> list[list[dict]]:
    """The rows cut into runs: one setting over rising worker counts (a setting named twice is two runs)."""
    runs: list[list[dict]] = []
    for r in rows:
        last = runs[-1][-1] if runs else None
        if last is None or r["setting"] != last["setting"] or r["workers"] <= last["workers"]:
            runs.append([])
        runs[-1].append(r)
    return runs


def _private_mib(procs: list[dict[str, int]]) -> list[float]:
    return [sum(v for k, v in p.items() if k != "pid" and not k.startswith("rss_")) / 1024 for p in procs]


def report(rows: list[dict]) -> None:
    """The tables of a run's rows (also from a saved --out file, `--report`): Pss per worker count, its growth per
    extra worker (between counts, and fitted over all counts of a run by least squares), and each process's private
    memory, before and after the warm-up queries."""
    print(
        "| workers started | workers | processes | tree Pss MiB | growth per extra worker MiB | as share of the item "
        "cache | item-input mappings: Rss / Pss / private MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for sel in _runs(rows):
        for i, r in enumerate(sel):
            cache_mib = r["item_cache_bytes"] / 2**20
            growth = (
                ""
                if i == 0
                else (r["tree_kib"]["pss"] - sel[i - 1]["tree_kib"]["pss"])
                / 1024
                / (r["workers"] - sel[i - 1]["workers"])
            )
            share = "" if i == 0 or not cache_mib else f"{growth / cache_mib:.0%}"
            m = r["item_inputs_kib"]
            print(
                f"| {r['setting']} ({cache_mib:.0f} MiB cache) | {r['workers']} | {r['processes']} | "
                f"{r['tree_kib']['pss'] / 1024:.0f} | {growth if growth == '' else f'{growth:.0f}'} | {share} | "
                f"{m['rss'] / 1024:.0f} / {m['pss'] / 1024:.0f} / {m['private'] / 1024:.0f} |"
            )
        if len(sel) > 1:
            fitted = np.polyfit([r["workers"] for r in sel], [r["tree_kib"]["pss"] / 1024 for r in sel], 1)[0]
            cache_mib = sel[-1]["item_cache_bytes"] / 2**20
            share = f" = {fitted / cache_mib:.0%} of the item cache" if cache_mib else ""
            print(
                f"{sel[0]['setting']}: growth per extra worker fitted over {len(sel)} counts: {fitted:.0f} MiB{share}"
            )
    if not all("private_by_process_kib" in r for r in rows):
        return  # saved before the breakdown was recorded
    print("\nprivate MiB: the mean worker in all (the largest process), then by mapping; the supervisor (if any)")
    for r in rows:
        for when, key in (
            ("before queries", "private_by_process_kib_before_queries"),
            ("after", "private_by_process_kib"),
        ):
            procs = r[key]
            workers = procs[-r["workers"] :]
            kinds = sorted({k for p in procs for k in p if k != "pid" and not k.startswith("rss_")})
            mean = {k: sum(p.get(k, 0) for p in workers) / len(workers) / 1024 for k in kinds}
            totals = _private_mib(workers)
            head = procs[0] if len(procs) > r["workers"] else None
            supervisor = (
                "" if head is None else "; supervisor " + ", ".join(f"{k} {head.get(k, 0) / 1024:.0f}" for k in kinds)
            )
            print(
                f"{r['setting']} x{r['workers']} {when}: worker {sum(totals) / len(totals):.0f} "
                f"({max(totals):.0f}): " + ", ".join(f"{k} {v:.0f}" for k, v in mean.items()) + supervisor
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=Path("/work/home-default"))
    p.add_argument("--space", default="default")
    p.add_argument("--workers", default="1,2,3")
    p.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"comma-separated, of: {', '.join(SETTINGS)}; `NAME@TREE` runs NAME's server from the checkout TREE",
    )
    p.add_argument("--port", type=int, default=18970)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--keep-item-cache",
        action="store_true",
        help="copy the home's item-input files too: a restart of a served home, where no worker builds them (by "
        "default one worker of every server builds them, and keeps what the build allocated)",
    )
    p.add_argument("--report", type=Path, help="print the tables of a saved --out file, measuring nothing")
    args = p.parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text())["rows"])
        return 0
    counts = [int(w) for w in args.workers.split(",")]
    chosen = [name.strip() for name in args.settings.split(",") if name.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-worker-memory-"))
    rows = []
    try:
        for setting in chosen:
            for workers in counts:
                home = work / f"home-{len(rows)}"
                skip = ("data",) if args.keep_item_cache else ("data", "item_inputs")
                shutil.copytree(args.home, home, ignore=shutil.ignore_patterns(*skip))
                name, _, tree = setting.partition("@")  # `NAME@TREE`: the setting run from another checkout
                env, cwd = dict(SETTINGS[name]), Path(tree) if tree else None
                with start_server(home, args.space, args.port, workers, env, cwd=cwd) as (url, pid):
                    loaded = private_by_kind(pid)  # ready, before any query
                    bodies = query_bodies(home, args.space, 10)["examples"]
                    closed_loop(args.port, pid, bodies, 4 * workers, 3.0)  # every worker has served queries
                    cache = httpx.get(f"{url}/v1/space", timeout=10).json().get("item_cache", [])
                    table_bytes = sum(int(t.get("bytes", 0)) for t in cache)
                    row = {
                        "setting": setting,
                        "workers": workers,
                        "processes": len(descendants(pid)),
                        "tree_kib": memory_kib(pid),
                        "item_inputs_kib": mapping_kib(pid, "item_inputs"),
                        "private_by_process_kib": private_by_kind(pid),
                        "private_by_process_kib_before_queries": loaded,
                        "item_cache_bytes": table_bytes,
                        "item_cache_copied": args.keep_item_cache,
                    }
                rows.append(row)
                print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows)
    if args.out:
        dump_json(args.out, {"rows": rows, "pid": os.getpid()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
