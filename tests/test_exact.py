"""Exact answers from the table of dense cluster posteriors: equal to the dense oracle, and never served stale
or damaged (a new dense version, a restart, a second replica over the same home, a corrupt or truncated file)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade import exact
from cascade.config import CascadeConfig
from cascade.engine import dense_oracle
from cascade.errors import RequestError
from cascade.exact import (
    ExactAnswer,
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
from cascade.plan import target_from_label, target_from_utility
from cascade.snapshot import Snapshot, build_snapshot
from cascade.target import Target
from service.exact_tables import ExactTables
from service.settings import Settings
from service.state import ServiceState


@pytest.fixture(scope="module")
def table(snapshot: Snapshot) -> ExactTable:
    return build_table(snapshot, progress=False)


def _same_answer(snapshot: Snapshot, table: ExactTable, target: Target, k: int) -> None:
    oracle = dense_oracle(snapshot, target, k)
    exact = table.answer(target, k)
    np.testing.assert_array_equal(exact.cluster_ids, oracle.cluster_ids)
    np.testing.assert_allclose(exact.scores, oracle.scores, rtol=1e-12, atol=0)
    np.testing.assert_allclose(exact.posteriors, oracle.posteriors, rtol=1e-6, atol=0)


# -- equal to the oracle ------------------------------------------------------------------------------------------
def test_table_is_the_oracles_posterior_of_every_cluster(snapshot: Snapshot, table: ExactTable) -> None:
    """Ranked over every cluster, the oracle's posteriors are the table's rows, bit for bit."""
    K = snapshot.space.num_clusters
    oracle = dense_oracle(snapshot, target_from_label(snapshot, 0), K)
    rows = np.exp(table.log_post[oracle.cluster_ids].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(rows, oracle.posteriors)
    assert table.log_post.shape == (K, snapshot.space.num_classes) and table.log_post.dtype == np.float32
    assert table.dense_sha256 == snapshot.dense.manifest.sha256
    assert table.build_flops == snapshot.space.num_items * snapshot.dense.flops.nonzero


@pytest.mark.parametrize("key_rows", [16_384, 7])
def test_every_label_equals_the_oracles_top_k(
    snapshot: Snapshot, table: ExactTable, key_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exact, "KEY_ROWS", key_rows)
    K = snapshot.space.num_clusters
    for label in range(snapshot.space.num_classes):
        for k in (1, 10, K):
            _same_answer(snapshot, table, target_from_label(snapshot, label), k)


@pytest.mark.parametrize("key_rows", [16_384, 7])  # 7: the ranking key in many blocks, as on a big space
def test_random_utilities_equal_the_oracles_top_k(
    snapshot: Snapshot, table: ExactTable, key_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exact, "KEY_ROWS", key_rows)
    rng = np.random.default_rng(0)
    C = snapshot.space.num_classes
    for i in range(20):
        utility = rng.normal(size=C) if i % 2 else rng.dirichlet(np.ones(C))
        _same_answer(snapshot, table, target_from_utility(snapshot, utility), 10)


def test_candidates_restrict_the_rows(snapshot: Snapshot, table: ExactTable) -> None:
    rng = np.random.default_rng(1)
    candidates = np.sort(rng.choice(snapshot.space.num_clusters, 60, replace=False))
    target = Target(utility=target_from_label(snapshot, 4).utility, candidates=candidates, label=4)
    exact = table.answer(target, 10)
    assert set(exact.cluster_ids.tolist()) <= set(candidates.tolist())
    # the oracle scores every cluster; among the candidates its order is the table's
    everything = dense_oracle(snapshot, target, snapshot.space.num_clusters).cluster_ids
    among = [c for c in everything.tolist() if c in set(candidates.tolist())][:10]
    assert exact.cluster_ids.tolist() == among


def test_an_exact_answer_reports_the_lookup(snapshot: Snapshot, table: ExactTable) -> None:
    K, C = snapshot.space.num_clusters, snapshot.space.num_classes
    result = table.answer(target_from_label(snapshot, 2), 7, snapshot_id=snapshot.id)
    assert isinstance(result, ExactAnswer) and not hasattr(result, "stages")  # a lookup, not a cascade stage
    assert (result.dense_name, result.dense_version) == (snapshot.dense.name, snapshot.dense.version)
    assert result.clusters_in == K and len(result.cluster_ids) == 7
    assert result.flops == result.flops_dense_kernel == lookup_flops(K, C) == 2 * K * C
    assert result.ms > 0 and result.snapshot_id == snapshot.id


def test_bad_k_names_the_field(snapshot: Snapshot, table: ExactTable) -> None:
    for k in (0, snapshot.space.num_clusters + 1):
        with pytest.raises(RequestError) as err:
            table.answer(target_from_label(snapshot, 1), k)
        assert err.value.field == "k"


# -- the file -----------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path: Path, snapshot: Snapshot, table: ExactTable) -> None:
    path = table_path(tmp_path, table.dense_sha256)
    save_table(table, path)
    assert path.parent.name == "exact" and path.name == f"{table.dense_sha256}.npz"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    loaded = load_table(path, table.dense_sha256, table.space_id, table.log_post.shape)
    np.testing.assert_array_equal(loaded.log_post, table.log_post)
    assert (loaded.dense_ref, loaded.build_flops) == (table.dense_ref, table.build_flops)
    # mapped from the file, read-only: worker processes share one copy
    assert not loaded.log_post.flags.writeable
    maps = Path("/proc/self/smaps").read_text().splitlines()
    assert any(line.rstrip().endswith(str(path.resolve())) for line in maps), "the table file is not mapped"


def test_stale_corrupt_or_truncated_files_are_refused(tmp_path: Path, table: ExactTable) -> None:
    path = table_path(tmp_path, table.dense_sha256)
    save_table(table, path)
    sha, space = table.dense_sha256, table.space_id
    with pytest.raises(TableError, match="dense sha256"):
        load_table(path, "0" * 64, space)
    with pytest.raises(TableError, match="space"):
        load_table(path, sha, space + "-other")
    with pytest.raises(TableError, match="shape"):
        load_table(path, sha, space, (table.num_clusters + 1, table.num_classes))
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(TableError, match="unreadable"):
        load_table(path, sha, space)
    damaged = bytearray(good)
    damaged[len(good) // 3] ^= 0xFF  # inside the array: the zip's CRC or our checksum catches it
    path.write_bytes(bytes(damaged))
    with pytest.raises(TableError):
        load_table(path, sha, space)
    # a well-formed file whose array was changed after its checksum was taken
    path.write_bytes(good)
    with np.load(path) as f:
        meta = json.loads(str(f["meta"][()]))
        altered = f["log_post"].copy()
    altered[0, 0] += 1.0
    np.savez(path, log_post=altered, meta=np.array(json.dumps(meta)))
    with pytest.raises(TableError, match="checksum"):
        load_table(path, sha, space)
    # a table of the first format ranked by `bayes` over every member: the oracle no longer does, never serve it
    path.write_bytes(good)
    with np.load(path) as f:
        first_format = {**json.loads(str(f["meta"][()])), "format": 1}
        array = f["log_post"].copy()
    np.savez(path, log_post=array, meta=np.array(json.dumps(first_format)))
    with pytest.raises(TableError, match="unknown format 1"):
        load_table(path, sha, space)


def test_table_bytes() -> None:
    assert table_bytes(10**6, 10) == 40_000_000
    assert table_bytes(10**8, 10) == 4_000_000_000


# -- the service state --------------------------------------------------------------------------------------------
def _home(tiny_home: Path, dst: Path) -> Path:
    shutil.copytree(tiny_home, dst, ignore=shutil.ignore_patterns("data", "exact"))
    return dst


def _ready(state: ServiceState) -> tuple[Snapshot, ExactTable]:
    assert state.exact.wait(120), "the table build did not finish"
    snapshot = state.require_snapshot()
    table = state.exact_table(snapshot)
    assert table is not None, state.exact_status(snapshot)
    return snapshot, table


def _new_dense_version(state: ServiceState) -> int:
    """Register another dense checkpoint (slightly different weights, so another sha256), inactive."""
    loaded = state.registry.load("dense")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return state.registry.register("dense", loaded.model, accuracy=loaded.manifest.accuracy, activate=False).version


def test_state_builds_persists_and_a_second_replica_reuses(tiny_home: Path, tmp_path: Path) -> None:
    home = _home(tiny_home, tmp_path / "home")
    first = ServiceState(Settings(home=home))
    first.load()
    snapshot, table = _ready(first)
    status = first.exact_status(snapshot)
    assert status["state"] == "ready" and status["source"] == "built"
    assert status["build_flops"] == table.build_flops and status["build_seconds"] > 0
    assert status["bytes"] == table.nbytes and status["break_even_queries"] > 0
    path = table_path(home / "spaces" / "default", snapshot.dense.manifest.sha256)
    assert path.is_file()
    second = ServiceState(Settings(home=home))  # another replica (or a restart) over the same home
    second.load()
    snapshot2, table2 = _ready(second)
    assert second.exact_status(snapshot2)["source"] == "disk"
    np.testing.assert_array_equal(table2.log_post, table.log_post)
    _same_answer(snapshot2, table2, target_from_label(snapshot2, 5), 10)


def test_new_dense_version_gets_its_own_table_never_the_stale_one(tiny_home: Path, tmp_path: Path) -> None:
    home = _home(tiny_home, tmp_path / "home")
    state = ServiceState(Settings(home=home))
    state.load()
    old_snapshot, old_table = _ready(state)
    old_sha = old_snapshot.dense.manifest.sha256
    version = _new_dense_version(state)
    new_snapshot = state.activate("dense", version)
    new_sha = new_snapshot.dense.manifest.sha256
    assert new_sha != old_sha
    deadline = time.monotonic() + 120
    while (seen := state.exact_table(new_snapshot)) is None and time.monotonic() < deadline:
        status = state.exact_status(new_snapshot)
        assert status["state"] == "building" and 0.0 <= status.get("progress", 0.0) <= 1.0
        time.sleep(0.005)
    assert seen is not None and seen.dense_sha256 == new_sha and seen.dense_ref == f"dense:{version}"
    assert not np.array_equal(seen.log_post, old_table.log_post)
    assert state.exact_table(old_snapshot) is None  # freed with the old version, never served again
    for label in range(new_snapshot.space.num_classes):
        _same_answer(new_snapshot, seen, target_from_label(new_snapshot, label), 10)
    space_dir = home / "spaces" / "default"
    assert table_path(space_dir, old_sha).is_file() and table_path(space_dir, new_sha).is_file()

    # a restart with the new version active: the new file is used, the old one is not
    restarted = ServiceState(Settings(home=home))
    restarted.load()
    snap, table = _ready(restarted)
    assert table.dense_sha256 == new_sha and restarted.exact_status(snap)["source"] == "disk"
    np.testing.assert_array_equal(table.log_post, seen.log_post)

    # the old version's table planted under the new version's name: refused and rebuilt, never served
    shutil.copyfile(table_path(space_dir, old_sha), table_path(space_dir, new_sha))
    replica = ServiceState(Settings(home=home))
    replica.load()
    snap, table = _ready(replica)
    assert replica.exact_status(snap)["source"] == "built" and table.dense_sha256 == new_sha
    np.testing.assert_array_equal(table.log_post, seen.log_post)

    # rolling back to the old version reuses its file
    back = restarted.rollback("dense")
    assert back.dense.manifest.sha256 == old_sha
    snap, table = _ready(restarted)
    assert table.dense_sha256 == old_sha and restarted.exact_status(snap)["source"] == "disk"
    np.testing.assert_array_equal(table.log_post, old_table.log_post)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupt_or_truncated_file_is_rebuilt_not_served(tiny_home: Path, tmp_path: Path, damage: str) -> None:
    home = _home(tiny_home, tmp_path / "home")
    state = ServiceState(Settings(home=home))
    state.load()
    snapshot, good = _ready(state)
    path = table_path(home / "spaces" / "default", snapshot.dense.manifest.sha256)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "flip":
        broken = bytearray(data)
        broken[len(data) // 2] ^= 0x55
        path.write_bytes(bytes(broken))
    else:
        path.write_bytes(b"")
    replica = ServiceState(Settings(home=home))
    replica.load()
    snap, table = _ready(replica)
    assert replica.exact_status(snap)["source"] == "built"
    np.testing.assert_array_equal(table.log_post, good.log_post)
    key = table_key(snap)
    assert load_table(path, *key).dense_sha256 == key[0]  # the rebuilt file replaced the damaged one


def test_too_big_or_switched_off_tables_are_not_built(snapshot: Snapshot, tmp_path: Path) -> None:
    small = ExactTables(tmp_path, max_bytes=table_bytes(snapshot.space.num_clusters, snapshot.space.num_classes) - 1)
    small.request(snapshot)
    assert small.wait(5) and small.get(snapshot) is None
    status = small.status(snapshot)
    assert status["state"] == "disabled" and "exact_max_bytes" in status["reason"]
    off = ExactTables(tmp_path, enabled=False)
    off.request(snapshot)
    assert off.wait(5) and off.get(snapshot) is None and off.status(snapshot)["state"] == "disabled"
    assert not (tmp_path / "exact").exists()


def test_a_swap_during_a_build_serves_only_the_new_dense_model(snapshot: Snapshot, tmp_path: Path) -> None:
    """Two swaps in a row (the first build may be cancelled or finish): only the last snapshot's table is served,
    and it is the table of the model the config names as dense."""
    other = build_snapshot(
        snapshot.space,
        snapshot.index,
        snapshot.variants,
        CascadeConfig(stages=snapshot.config.stages, dense="cnn-s50"),
    )
    assert table_key(other) != table_key(snapshot)
    tables = ExactTables(tmp_path)
    tables.request(snapshot)
    tables.request(other)
    assert tables.wait(120)
    assert tables.get(snapshot) is None and tables.status(snapshot)["state"] != "ready"
    table = tables.get(other)
    assert table is not None and table.dense_ref == f"cnn-s50:{other.dense.version}"
    assert tables.status(other)["state"] == "ready"
    for label in (0, 6):
        _same_answer(other, table, target_from_label(other, label), 10)
