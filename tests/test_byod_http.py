"""A user's own `.npz` served over HTTP: every answer speaks the user's cluster ids, item ids and labels;
`/v1/models` says whether each version is served and why not; the CLI's registry changes reach a running server
through `POST /v1/admin/reload`, and a model that does not fit the space is logged once."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Server, start_server, stop_server
from test_byod_data import LABELS, user_npz

from service.cli import main

TOKEN = "byod-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def byod_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("byod")
    data = user_npz(root / "mine.npz", clusters=150)
    home = root / "var-mine"
    assert (
        main(["bootstrap", "--dataset", str(data), "--home", str(home), "--epochs", "2", "--quiet", "--no-pair"]) == 0
    )
    return home


@pytest.fixture(scope="module")
def byod_server(byod_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("byod-served") / "home"
    shutil.copytree(byod_home, home)
    s = start_server(home, {"PRUNECASCADE_ADMIN_TOKEN": TOKEN})
    yield s
    stop_server(s)


def _user_cluster_ids(home: Path) -> set[int]:
    with np.load(home / "spaces" / "default" / "space.npz") as f:
        return set(f["cluster_ids"].tolist())


def _models(server: Server) -> dict[tuple[str, int], dict]:
    body = httpx.get(f"{server.url}/v1/models").json()
    return {(m["name"], m["version"]): m for m in body["models"]}


@pytest.mark.parametrize("mode", ["exact", "cascade"])
def test_query_answers_carry_the_users_cluster_ids_and_labels(byod_server: Server, mode: str) -> None:
    r = httpx.post(f"{byod_server.url}/v1/query", json={"target": {"utility": [0, 1, 0]}, "k": 8, "mode": mode})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == mode and body["outputs"] == [str(v) for v in LABELS]
    ids = [c["cluster_id"] for c in body["clusters"]]
    assert set(ids) <= _user_cluster_ids(byod_server.home) and all((i - 1000) % 7 == 0 for i in ids)
    for cluster_id in ids[:3]:  # the answer's ids open the clusters, which hold label 7 (utility on "7")
        cluster = httpx.get(f"{byod_server.url}/v1/clusters/{cluster_id}").json()
        assert cluster["cluster_id"] == cluster_id and cluster["label"] == 7


def test_cluster_and_item_routes_take_and_give_the_users_ids(byod_server: Server) -> None:
    url = byod_server.url
    cluster_id = min(_user_cluster_ids(byod_server.home))
    cluster = httpx.get(f"{url}/v1/clusters/{cluster_id}", params={"limit": 4}).json()
    assert cluster["size"] == 6 and len(cluster["members"]) == 4 and cluster["purity"] == 1.0
    assert cluster["label"] in LABELS
    assert all(m >= 500_000 and (m - 500_000) % 3 == 0 for m in cluster["members"])  # the user's id column
    rest = httpx.get(f"{url}/v1/clusters/{cluster_id}", params={"offset": 4, "limit": 4}).json()
    assert len(rest["members"]) == 2 and not set(rest["members"]) & set(cluster["members"])
    item = httpx.get(f"{url}/v1/items/{cluster['members'][0]}").json()
    assert item["item_id"] == cluster["members"][0] and item["cluster_id"] == cluster_id
    assert item["label"] == cluster["label"] and len(item["x"]) == 8

    missing = httpx.get(f"{url}/v1/clusters/0")  # a position, not one of the user's ids
    assert missing.status_code == 404
    detail = missing.json()["detail"][0]
    assert detail["loc"] == ["path", "cluster_id"] and "cluster ids from 1" in detail["msg"]
    gone = httpx.get(f"{url}/v1/items/3").json()["detail"][0]
    assert gone["loc"] == ["path", "item_id"] and "no item 3" in gone["msg"]


def test_space_describes_the_users_data(byod_server: Server) -> None:
    space = httpx.get(f"{byod_server.url}/v1/space").json()
    assert space["clusters"] == "given" and space["dataset"].endswith("mine.npz")
    assert space["num_classes"] == 3 and space["cluster_sizes"] == {"min": 6, "median": 6, "max": 6}
    assert space["classes"] == [2, 7, 9]


def test_every_cluster_of_the_users_file_is_served_and_says_whether_the_models_saw_it(
    byod_server: Server, byod_home: Path
) -> None:
    url = byod_server.url
    space = httpx.get(f"{url}/v1/space").json()
    assert space["num_clusters"] == 150 and space["num_items"] == 900  # all of mine.npz, not the pool only
    seen = space["seen_by_models"]
    assert set(seen) == {"train", "validation", "test", "pool"}
    assert sum(p["clusters"] for p in seen.values()) == 150 and seen["train"]["clusters"] > 0
    with np.load(byod_home / "spaces" / "default" / "space.npz") as f:
        ids, parts = f["cluster_ids"], f["cluster_parts"]
    for code, name in enumerate(("train", "validation", "test", "pool")):
        cluster_id = int(ids[np.flatnonzero(parts == code)[0]])
        body = httpx.get(f"{url}/v1/clusters/{cluster_id}").json()
        assert body["cluster_id"] == cluster_id and body["seen_by_models"] == name


def test_an_unknown_cluster_of_the_training_file_says_the_space_is_the_space_file(tmp_path: Path) -> None:
    train = user_npz(tmp_path / "train.npz", clusters=60)
    space_file = user_npz(tmp_path / "space.npz", clusters=20)
    home = tmp_path / "home"
    argv = ["bootstrap", "--dataset", str(train), "--space-dataset", str(space_file), "--home", str(home)]
    assert main([*argv, "--epochs", "2", "--quiet", "--no-pair"]) == 0
    server = start_server(home)
    try:
        r = httpx.get(f"{server.url}/v1/clusters/{1000 + 7 * 50}")  # a cluster of train.npz, not of space.npz
        assert r.status_code == 404
        msg = r.json()["detail"][0]["msg"]
        assert "no cluster 1350" in msg and f"The space is the file {space_file}" in msg
        assert "clusters of the training file are not served" in msg
        assert httpx.get(f"{server.url}/v1/space").json()["seen_by_models"] is None
    finally:
        stop_server(server)


def test_cli_changes_reach_the_running_server_through_reload(byod_server: Server) -> None:
    url, home = byod_server.url, byod_server.home
    assert all(m["served"] and m["not_served"] is None for m in _models(byod_server).values())
    assert {name for name, _ in _models(byod_server)} >= {"mlp-s25", "mlp-s50", "mlp-m10", "dense"}
    argv = ["prune", "--home", str(home), "--from", "dense", "--method", "magnitude", "--keep", "0.2"]
    assert main([*argv, "--name", "mlp-m20"]) == 0
    entry = _models(byod_server)[("mlp-m20", 1)]
    assert entry["active"] and not entry["served"] and "POST /v1/admin/reload" in entry["not_served"]
    stages = [{"variant": "mlp-m20", "samples": 2, "keep": 30}, {"variant": "dense", "samples": 6}]
    query = {"target": {"utility": [1, 0, 0]}, "k": 5, "stages": stages}
    refused = httpx.post(f"{url}/v1/query", json=query)
    assert refused.status_code == 422 and "unknown variant 'mlp-m20'" in refused.text

    assert httpx.post(f"{url}/v1/admin/reload").status_code == 401  # an admin route
    r = httpx.post(f"{url}/v1/admin/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["changed"] == ["mlp-m20:1"] and r.json()["served"]["mlp-m20"] == 1
    assert _models(byod_server)[("mlp-m20", 1)]["served"]
    answer = httpx.post(f"{url}/v1/query", json=query)
    assert answer.status_code == 200 and answer.json()["stages"][0]["variant"] == "mlp-m20"
    assert httpx.post(f"{url}/v1/admin/reload", headers=AUTH).json()["changed"] == []  # nothing new on disk


def test_a_model_that_does_not_fit_says_why_and_is_logged_once(byod_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(byod_home, home)
    server = start_server(home, {"PRUNECASCADE_ADMIN_TOKEN": TOKEN, "PRUNECASCADE_LOG_LEVEL": "info"})
    try:
        argv = ["train", "--home", str(home), "--dataset", "digits", "--arch", "mlp", "--name", "digits-mlp"]
        assert main([*argv, "--epochs", "1"]) == 0
        assert httpx.post(f"{server.url}/v1/admin/reload", headers=AUTH).json()["changed"] == ["digits-mlp:1"]
        prune = ["prune", "--home", str(home), "--from", "dense", "--method", "magnitude", "--keep", "0.3"]
        assert main([*prune, "--name", "mlp-m30"]) == 0  # another change: the snapshot is rebuilt again
        assert httpx.post(f"{server.url}/v1/admin/reload", headers=AUTH).json()["changed"] == ["mlp-m30:1"]
        entry = _models(server)[("digits-mlp", 1)]
        assert entry["active"] and not entry["served"]
        assert entry["not_served"] == "does not fit the space: it takes 64 inputs; the space's items have 8 features"
    finally:
        stop_server(server)
    assert server.process.stderr is not None
    log = server.process.stderr.read().decode()
    assert log.count("digits-mlp:1 is active but not served") == 1, log[-2000:]
