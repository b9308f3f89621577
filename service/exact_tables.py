"""The life cycle of the exact-answer tables (cascade/exact.py) inside one service process.

After every swap the state asks for the table of the new snapshot's (dense sha256, space). A single background
thread builds one table at a time, reusing a valid file from disk (a restart, another replica) and rebuilding a
missing, corrupt, truncated or stale one; queries never wait for it: until the table is ready they get None and
run the cascade. Only the table of the current snapshot is kept in memory, and tables are looked up by the
dense checkpoint's sha256, so a table is never served with another dense version or space."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from cascade.exact import (
    ExactTable,
    TableError,
    build_table,
    load_table,
    lookup_flops,
    save_table,
    table_bytes,
    table_key,
    table_path,
)
from cascade.snapshot import Snapshot

__all__ = ["ExactTables", "DEFAULT_MAX_BYTES", "estimated_cascade_flops"]

log = logging.getLogger("prunecascade")

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: K x C float32 beyond this is not built, queries use the cascade

Key = tuple[str, str]


def estimated_cascade_flops(snapshot: Snapshot) -> int:
    """FLOPs of the default cascade for a target over every cluster: exact for the first stage; later stages
    assume their kept clusters have the space's mean of min(size, samples) members."""
    sizes = snapshot.space.sizes
    classes = snapshot.space.num_classes
    clusters = len(sizes)
    total = 0
    for i, stage in enumerate(snapshot.config.stages):
        variant = snapshot.variants[stage.variant]
        per_cluster = float(sizes.clip(max=stage.samples).mean())
        items = float(sizes.clip(max=stage.samples).sum()) if i == 0 else clusters * per_cluster
        total += int(items * (variant.flops.nonzero + classes))
        clusters = min(stage.keep or clusters, clusters)
    return total


class ExactTables:
    def __init__(self, space_dir: Path, enabled: bool = True, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.space_dir = Path(space_dir)
        self.enabled = enabled
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._tables: dict[Key, ExactTable] = {}  # ready; read without the lock (one dict lookup)
        self._status: dict[Key, dict[str, Any]] = {}
        self._current: Key | None = None
        self._wanted: Snapshot | None = None
        self._thread: threading.Thread | None = None
        self._building: Key | None = None
        self._cancel = threading.Event()
        self._warned: set[Key] = set()

    # -- what queries and /v1/space read ----------------------------------------------------------------------
    def get(self, snapshot: Snapshot) -> ExactTable | None:
        """The ready table of this snapshot's dense checkpoint and space, else None. Never blocks."""
        key = table_key(snapshot)
        table = self._tables.get(key)
        if table is None or (table.dense_sha256, table.space_id) != key:
            return None
        return table

    def status(self, snapshot: Snapshot) -> dict[str, Any]:
        """state: ready | building (with `progress`, 0..1, once the build runs) | disabled | failed, with the
        one-time build cost and its break-even against the default cascade."""
        key = table_key(snapshot)
        space = snapshot.space
        out: dict[str, Any] = {
            "state": "building",
            "dense": f"{snapshot.dense.name}:{snapshot.dense.version}",
            "bytes": table_bytes(space.num_clusters, space.num_classes),
            "max_bytes": self.max_bytes,
            "build_seconds": None,
            "build_flops": None,
            "lookup_flops": lookup_flops(space.num_clusters, space.num_classes),
            "break_even_queries": None,
        }
        with self._lock:
            out.update(self._status.get(key, {}))
            table = self._tables.get(key)
        if not self.enabled:
            out.update(state="disabled", reason="exact answers are switched off (exact_enabled=false)")
        elif table is not None:
            saved = estimated_cascade_flops(snapshot) - out["lookup_flops"]
            out.update(
                state="ready",
                build_seconds=table.build_seconds,
                build_flops=table.build_flops,
                break_even_queries=table.build_flops / saved if saved > 0 else None,
            )
        return out

    # -- what the state calls after every swap ------------------------------------------------------------------
    def request(self, snapshot: Snapshot) -> None:
        """Make this snapshot's table the wanted one: start (or redirect) the background build, free the tables
        of other dense versions. Cheap and non-blocking; called under the state's lock."""
        key = table_key(snapshot)
        with self._lock:
            self._current = key
            for other in [k for k in self._tables if k != key]:
                del self._tables[other]
            if not self.enabled or key in self._tables:
                return
            size = table_bytes(snapshot.space.num_clusters, snapshot.space.num_classes)
            if size > self.max_bytes:
                self._status[key] = {
                    "state": "disabled",
                    "reason": f"the table needs {size:,} bytes, more than exact_max_bytes={self.max_bytes:,}",
                }
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("exact table for %s not built: %s", snapshot.dense.name, self._status[key]["reason"])
                return
            if self._building is not None and self._building != key:
                self._cancel.set()  # a build nobody will use any more: stop it, this one comes next
            elif self._building == key:
                self._cancel.clear()  # swapped away and back while it ran: let it finish
            self._wanted = snapshot
            if self._status.get(key, {}).get("state") != "building":
                self._status[key] = {"state": "building"}
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="exact-table-builder", daemon=True)
                self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no build is pending or running (tests, benchmarks, `--wait` style callers)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._thread is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    # -- the builder thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                snapshot, self._wanted = self._wanted, None
                if snapshot is None:
                    self._thread = None
                    self._building = None
                    self._idle.notify_all()
                    return
                key = table_key(snapshot)
                if key in self._tables:
                    continue
                self._building = key
                self._cancel.clear()
            try:
                table, source = self._obtain(snapshot, key)
            except TableError as exc:
                if self._cancel.is_set():
                    with self._lock:
                        self._status.pop(key, None)
                    continue
                table, source = None, f"failed: {exc}"
            except Exception as exc:  # a failed build never takes the process down; queries use the cascade
                log.exception("building the exact table for %s failed", snapshot.dense.name)
                table, source = None, f"failed: {type(exc).__name__}: {exc}"
            with self._lock:
                self._building = None
                if table is None:
                    self._status[key] = {"state": "failed", "reason": source}
                    continue
                if key == self._current:
                    self._tables[key] = table
                    self._status[key] = {"state": "ready", "source": source}
                else:  # swapped away meanwhile: saved on disk for a later swap back, not kept in memory
                    self._status.pop(key, None)
            log.info(
                "exact table for %s (%s): %s, built in %.2f s",
                table.dense_ref,
                table.space_id,
                source,
                table.build_seconds,
            )

    def _obtain(self, snapshot: Snapshot, key: Key) -> tuple[ExactTable, str]:
        """From disk if a valid file is there, else built (and saved for the next process)."""
        sha, space_id = key
        path = table_path(self.space_dir, sha)
        shape = (snapshot.space.num_clusters, snapshot.space.num_classes)
        if path.exists():
            try:
                return load_table(path, sha, space_id, shape), "disk"
            except FileNotFoundError:
                pass  # removed meanwhile: build it
            except TableError as exc:
                log.warning("exact table file rejected, rebuilding it: %s", exc)
        status = self._status.setdefault(key, {"state": "building"})
        table = build_table(
            snapshot, progress=False, cancel=self._cancel, on_progress=lambda done: status.update(progress=done)
        )
        try:
            save_table(table, path)
        except OSError as exc:  # a read-only volume: serve it from memory, rebuild at the next start
            log.warning("could not save the exact table to %s: %s", path, exc)
            return table, "built (not saved)"
        return table, "built"
