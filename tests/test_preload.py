"""The home read by the supervisor of forked workers before it forks (service/preload.py): a worker serves that read
only while the files it came from are unchanged (`home_fingerprint`); otherwise it reads the home as it is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from service_fixtures import copy_home, faiss_by_default

from cascade.item_store import ITEM_INPUTS_DIR
from models.registry import ModelRegistry
from service.preload import read_before_fork, take_preloaded
from service.settings import Settings
from service.state import ServiceState, home_fingerprint


@pytest.fixture()
def home(tiny_home: Path, tmp_path: Path) -> Path:
    return copy_home(tiny_home, tmp_path / "home")


def _settings(home: Path) -> Settings:
    return Settings(home=home, exact_enabled=False, cache_enabled=False)


def test_a_worker_serves_the_read_it_was_forked_with(home: Path) -> None:
    read = ServiceState(_settings(home)).read_home()
    state = ServiceState(_settings(home), preloaded=read)
    assert state.load() is read.snapshot  # the very objects: their pages are the parent's, shared
    assert state.active == dict(read.active) and state.config is read.config


def test_a_worker_reads_a_home_changed_after_the_read(home: Path) -> None:
    read = ServiceState(_settings(home)).read_home()
    assert read.snapshot.config.pair_stages  # the tiny home's pair cascade
    faiss_by_default(home)  # an operator's change on disk after the parent read the home
    state = ServiceState(_settings(home), preloaded=read)
    served = state.load()
    assert served is not read.snapshot and served.config.pair_stages == ()
    again = ServiceState(_settings(home), preloaded=read)  # a second worker forked with the same stale read
    assert again.load().id == served.id


def test_the_fingerprint_follows_every_file_a_load_reads(home: Path) -> None:
    settings = _settings(home)
    before = home_fingerprint(settings)
    assert before == home_fingerprint(settings)
    names = {Path(p).name for p, *_ in before}
    assert {"cascade.json", "ACTIVE", "manifest.json", "space.npz", "index.faiss"} <= names

    (home / "registry" / ".tmp-upload").mkdir()  # a write in progress (dot names) is not a change
    (settings.space_dir / ".reader-weights.tmp").write_bytes(b"partial")
    assert home_fingerprint(settings) == before

    registry = ModelRegistry(settings.registry_dir)
    name = "pair-dense"
    version = registry.active_version(name)
    registry.activate(name, version)  # the same version written again: a new file all the same
    changed = home_fingerprint(settings)
    assert changed != before

    space_file = settings.space_dir / "queries.npz"
    stat = space_file.stat()
    os.utime(space_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert home_fingerprint(settings) != changed


def test_the_parent_builds_the_item_tables_the_workers_serve(home: Path) -> None:
    threads = torch.get_num_threads()
    try:
        read = read_before_fork(_settings(home))
    finally:
        torch.set_num_threads(threads)
    assert read is not None and take_preloaded() is read and take_preloaded() is None  # given once
    built = read.snapshot.item_cache.entries()
    assert built and all(entry.mapped for entry in built)  # in files every worker maps
    assert {p.suffix for p in (_settings(home).space_dir / ITEM_INPUTS_DIR).iterdir()} >= {".npy", ".json"}

    state = ServiceState(_settings(home), preloaded=read)
    served = state.load()  # a worker's first load: nothing left to build
    assert served is read.snapshot
    assert [id(e) for e in served.item_cache.entries()] == [id(e) for e in built]
