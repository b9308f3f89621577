"""Item-input tables on disk, memory-mapped read-only: several worker processes of one server (or replicas on one
host) map the same file, so the table is in memory once (the page cache), not once per process.

A table is written once, by whichever process needs it first, under an exclusive file lock: to a temporary file,
then renamed, so a reader never sees half a table. Its name is a digest of what determines its contents (the
model's `item_inputs_key`, the items' bytes and the dtype), so a new trunk or a new space gets a new file and a
stale one is never read. A table that cannot be written (a read-only home) is built in memory instead."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cascade.npz_map import shared_tensor

__all__ = ["mapped_table", "features_digest", "ITEM_INPUTS_DIR", "DTYPES"]

ITEM_INPUTS_DIR = "item_inputs"
DTYPES = {"float32": torch.float32, "float16": torch.float16}

log = logging.getLogger("prunecascade.item_store")


def features_digest(features: torch.Tensor) -> str:
    """sha256 of the items' bytes (part of a table's name): 23,000 x 40 floats hash in a few ms."""
    return hashlib.sha256(memoryview(features.contiguous().numpy()).cast("B")).hexdigest()[:24]  # no copy


def _map(path: Path) -> torch.Tensor:
    return shared_tensor(np.load(path, mmap_mode="r", allow_pickle=False))  # the engine only gathers rows from it


def mapped_table(
    directory: Path, key: str, dtype: str, build: Callable[[], tuple[torch.Tensor, int]]
) -> tuple[torch.Tensor, int, bool]:
    """(table, build FLOPs, mapped): the table for `key` from `directory`, built and written first if no process
    has yet; `mapped` is False when it could not be written and lives in this process's memory only."""
    name = hashlib.sha256(f"{key}|{dtype}".encode()).hexdigest()[:32]
    path = directory / f"{name}.npy"
    meta_path = directory / f"{name}.json"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / f".{name}.lock", "a+")  # noqa: SIM115 - held for the block below
    except OSError as exc:
        log.warning("item inputs cannot be stored under %s (%s): built in memory", directory, exc)
        table, flops = build()
        return table.to(DTYPES[dtype]), flops, False
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process builds, the others wait and then map its file
        try:
            if path.exists() and meta_path.exists():
                try:
                    meta = json.loads(meta_path.read_text())
                    table = _map(path)
                    if meta.get("key") == key and list(table.shape) == meta.get("shape"):
                        return table, int(meta["build_flops"]), True
                except (OSError, ValueError, KeyError):
                    pass  # unreadable: rebuilt below
            table, flops = build()
            array = table.to(DTYPES[dtype]).contiguous().numpy()
            tmp = directory / f".{name}.{os.getpid()}.tmp.npy"
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
            meta_tmp = directory / f".{name}.{os.getpid()}.tmp.json"
            meta = {"key": key, "dtype": dtype, "shape": list(array.shape), "build_flops": flops}
            meta_tmp.write_text(json.dumps(meta))
            meta_tmp.replace(meta_path)
            return _map(path), flops, True
        except OSError as exc:
            log.warning("item inputs cannot be stored under %s (%s): built in memory", directory, exc)
            table, flops = build()
            return table.to(DTYPES[dtype]), flops, False
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
