"""Pair models for a user's own `.npz`: the training split's clusters train the pair models and
the bi-encoder; the space ships members held out of its clusters as queries; the grades are measured to be three
(own cluster, same label, other) where the clusters carry instance structure, and fall back to two where not.

Data: MNIST-1D prototype views saved as a user's `.npz` (a cluster = the views of one prototype: instance
structure), and the same items regrouped into random same-label clusters (none)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Server, start_server, stop_server

from cascade.bootstrap import bootstrap, train_pair_on_clusters, wants_user_pair
from cascade.bootstrap_config import BootstrapConfig, PairConfig, PrunedPairVariant, PrunedVariant
from cascade.config import Stage
from cascade.queries import QuerySet, cluster_grades, default_gains, hold_out_members
from cascade.space import META_FILE, Space
from models.biencoder_training import BiEncoderTrainConfig, train_biencoder
from models.data import DatasetError, load_dataset
from models.pair import PairNetwork
from models.pair_training import ListwiseConfig, PairTrainConfig, instance_auc, make_pairs, pair_spec_for
from models.prototypes import PrototypeConfig, make_prototype_set, member_set
from models.registry import ModelRegistry
from service.commands.bootstrap import config_from

SMALL_PAIR = PairConfig(
    queries=30,
    biencoder=BiEncoderTrainConfig(steps=100, batch_prototypes=64, eval_every=50),
    training=PairTrainConfig(steps=150, batch_size=128, eval_every=50, val_pairs=500),
    listwise=ListwiseConfig(steps=150, queries=16, group=8, members=2, top=16, eval_every=50, val_queries=128),
    hidden=(64, 32),
    variants=(PrunedPairVariant("pair-m25", "magnitude", 0.25, reweight=False, finetune_steps=30),),
    stages=(Stage(variant="pair-m25", samples=2, keep=20), Stage(variant="pair-dense", samples=6)),
)


def views_npz(path: Path, structured: bool, prototypes: int = 300, views: int = 6) -> Path:
    """A user's `.npz` of MNIST-1D prototype views (x, y = digit, cluster = prototype id x 3 + 11). Without
    structure, each digit's items are dealt into clusters of the same sizes at random: a cluster then says
    nothing about an item beyond its label."""
    s = make_prototype_set(PrototypeConfig(num_prototypes=prototypes, views=views, seed=5), "space")
    cluster = s.cluster.copy()
    if not structured:
        rng = np.random.default_rng(1)
        for digit in np.unique(s.y):
            rows = np.flatnonzero(s.y == digit)
            cluster[rng.permutation(rows)] = cluster[rows]
    np.savez(path, x=s.x, y=s.y, cluster=cluster * 3 + 11)
    return path


def _config(data: Path) -> BootstrapConfig:
    return BootstrapConfig(
        dataset=str(data),
        arch="mlp",
        epochs=2,
        variants=(PrunedVariant("mlp-s50", "layer-weight-norm", 0.5, reweight=True),),
        stages=(Stage(variant="mlp-s50", samples=2, keep=40), Stage(variant="dense", samples=6)),
        pair=SMALL_PAIR,
        tune=False,  # the pair cascade these tests query is SMALL_PAIR's; tuning is tested below on a copy
    )


@pytest.fixture(scope="module")
def structured_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("byod-pair")
    home = root / "home"
    bootstrap(home, _config(views_npz(root / "views.npz", structured=True)), progress=False)
    return home


@pytest.fixture(scope="module")
def structured_server(structured_home: Path) -> Iterator[Server]:
    s = start_server(structured_home)
    yield s
    stop_server(s)


def test_member_pairs_never_pair_a_member_with_itself_and_grade_by_cluster() -> None:
    x = np.arange(40, dtype=np.float32).reshape(20, 2)  # every row distinct
    y = np.repeat([0, 0, 1, 1, 1], 4)
    cluster = np.repeat([7, 3, 9, 5, 1], 4)
    cluster[0] = 42  # a singleton: no same-cluster pair possible, so it is left out
    data = member_set(x, y, cluster)
    assert len(data.cluster_labels) == 5 and len(data.x) == 19
    pairs = make_pairs(data, 3000, (1 / 3, 1 / 3, 1 / 3), np.random.default_rng(0))
    row_of = {tuple(r): i for i, r in enumerate(data.x)}
    q = np.array([row_of[tuple(r)] for r in pairs.q.numpy()])
    xs = np.array([row_of[tuple(r)] for r in pairs.x.numpy()])
    grade = pairs.grade.numpy()
    assert set(grade.tolist()) == {0, 1, 2}
    assert (q[grade == 2] != xs[grade == 2]).all()  # two different members of one cluster
    same_cluster = data.cluster[q] == data.cluster[xs]
    np.testing.assert_array_equal(grade == 2, same_cluster)
    np.testing.assert_array_equal(grade >= 1, data.y[q] == data.y[xs])
    two = make_pairs(replace(data, num_grades=2), 600, (1 / 3, 1 / 3, 1 / 3), np.random.default_rng(1))
    assert set(two.grade.tolist()) == {0, 1}  # without instance structure the own cluster is one of its label


@pytest.mark.parametrize("dim", [2, 5, 8, 12, 40, 64, 300, 784])
def test_the_pair_spec_fits_any_feature_length(dim: int) -> None:
    import torch

    spec = pair_spec_for(dim, 3, (16,))
    assert spec.max_shift < spec.feature_length and spec.feature_length % spec.regions == 0
    assert spec.feature_length <= 128
    assert PairNetwork(spec)(torch.randn(2, dim), torch.randn(2, dim)).shape == (2, 3)


def test_held_out_members_leave_their_cluster_in_the_space() -> None:
    cluster = np.repeat([5, 6, 7, 8], [1, 2, 3, 4])
    rows = hold_out_members(cluster, 10, np.random.default_rng(0))
    assert len(rows) == 3 and len(set(cluster[rows].tolist())) == 3  # one per cluster of >= 2 members
    assert 5 not in cluster[rows]
    assert len(hold_out_members(cluster, 2, np.random.default_rng(0))) == 2
    assert default_gains(3) == (0.0, 1.0, 3.0) and default_gains(2) == (0.0, 1.0)


def test_structured_clusters_keep_three_grades_recorded_everywhere(structured_home: Path) -> None:
    meta = json.loads((structured_home / "spaces" / "default" / META_FILE).read_text())
    grades = meta["grades"]
    assert grades["num_grades"] == 3 and grades["gains"] == [0.0, 1.0, 3.0]
    assert grades["instance_auc"] >= grades["threshold"] == SMALL_PAIR.instance_auc_threshold
    assert json.loads((structured_home / "bootstrap.json").read_text())["grades"] == grades
    dense = ModelRegistry(structured_home / "registry").manifest("pair-dense")
    assert dense.spec["num_grades"] == 3 and dense.extra["grades"] == grades
    assert len(dense.extra["grade_prior"]) == 3


def test_queries_are_held_out_members_never_items_and_grades_are_constant_on_clusters(
    structured_home: Path,
) -> None:
    space_dir = structured_home / "spaces" / "default"
    space, queries = Space.load(space_dir), QuerySet.load(space_dir)
    assert queries is not None and len(queries) == SMALL_PAIR.queries
    data = np.load(structured_home.parent / "views.npz")
    splits = load_dataset(str(structured_home.parent / "views.npz"))
    assert space.num_items + len(queries) == len(data["x"])  # every cluster served, less one member per query
    assert space.num_clusters == len(np.unique(data["cluster"])) > len(np.unique(splits.cluster_pool))
    # honest measurement: every query comes from a cluster no model saw
    assert {space.part_of(int(c)) for c in queries.cluster} == {"pool"}
    items = {row.tobytes() for row in space.features}
    assert not any(q.tobytes() in items for q in queries.x)  # a query is never an item
    assert len(set(queries.cluster.tolist())) == len(queries)  # one query per cluster
    true_cluster = {row.tobytes(): c for row, c in zip(data["x"], data["cluster"], strict=True)}
    item_cluster = np.repeat(np.arange(space.num_clusters), np.diff(space.offsets))
    for i in range(len(queries)):
        own = int(queries.cluster[i])
        assert space.cluster_ids[own] == true_cluster[queries.x[i].tobytes()]  # its own cluster, still there
        assert space.offsets[own + 1] > space.offsets[own]
        per_item = np.where(item_cluster == own, 2, (space.labels == queries.label[i]).astype(np.int64))
        per_cluster = cluster_grades(space.cluster_labels, own, int(queries.label[i]))
        np.testing.assert_array_equal(per_item, per_cluster[item_cluster])  # constant on every cluster
        assert (per_cluster == 2).sum() == 1


def test_structureless_clusters_fall_back_to_two_grades(tmp_path: Path) -> None:
    splits = load_dataset(str(views_npz(tmp_path / "random.npz", structured=False)))
    assert splits.cluster_train is not None and splits.cluster_val is not None
    train = member_set(splits.x_train, splits.y_train, splits.cluster_train)
    val = member_set(splits.x_val, splits.y_val, splits.cluster_val)
    pair = replace(SMALL_PAIR, listwise=replace(SMALL_PAIR.listwise, steps=100))
    encoder = train_biencoder(train, val, pair.biencoder)
    model, report, grades = train_pair_on_clusters(train, val, pair, encoder)
    assert grades["num_grades"] == 2 and grades["gains"] == [0.0, 1.0]
    assert grades["instance_auc"] < pair.instance_auc_threshold and "no instance structure" in grades["decision"]
    assert model.spec.num_grades == 2 and len(report.grade_prior) == 2
    # the two-grade model still tells a label from another: same label (grade 1) ranks above other (grade 0)
    pairs = make_pairs(replace(val, num_grades=2), 1000, (0.5, 0.0, 0.5), np.random.default_rng(3))
    assert instance_auc_like(model, pairs) > 0.6  # measured 0.67 (MNIST-1D digits are hard), chance 0.5


def instance_auc_like(model: PairNetwork, pairs) -> float:
    """AUC of log p(grade 1) between grade-1 and grade-0 pairs."""
    import torch

    with torch.no_grad():
        s = torch.log_softmax(model(pairs.q, pairs.x), 1)[:, 1].numpy()
    pos, neg = s[pairs.grade.numpy() == 1], s[pairs.grade.numpy() == 0]
    return float((pos[:, None] > neg[None, :]).mean())


def test_the_structure_measure_is_chance_for_an_untrained_model() -> None:
    import torch

    torch.manual_seed(0)
    views = make_prototype_set(PrototypeConfig(num_prototypes=60, views=4), "val")
    val = member_set(views.x, views.y, views.cluster)
    auc = instance_auc(PairNetwork(pair_spec_for(40, 3, (16,))), val, pairs=1000)
    assert 0.3 < auc < 0.7


def test_pair_flags_and_the_default(tmp_path: Path) -> None:
    import argparse

    from service.cli import build_parser

    def args(*argv: str) -> argparse.Namespace:
        return build_parser("bootstrap").parse_args(["bootstrap", *argv])

    data = views_npz(tmp_path / "v.npz", structured=True, prototypes=100)
    assert config_from(args("--dataset", str(data))).user_pair is None  # default: when there is a cluster column
    assert config_from(args("--dataset", str(data), "--no-pair")).user_pair is False
    steps = config_from(args("--dataset", str(data), "--pair-steps", "90")).pair
    assert steps is not None and steps.training.steps == 90 and steps.biencoder.steps == 60
    assert steps.listwise.steps == 90 and steps.listwise.eval_every <= 90
    with pytest.raises(ValueError, match="--pair-steps: must be >= 1"):
        config_from(args("--dataset", str(data), "--pair-steps", "0"))
    with pytest.raises(ValueError, match="--pair/--no-pair"):
        config_from(args("--dataset", "digits", "--pair"))
    with_clusters = load_dataset(str(data))
    assert wants_user_pair(BootstrapConfig(dataset=str(data)), with_clusters)
    assert not wants_user_pair(BootstrapConfig(dataset=str(data), user_pair=False), with_clusters)
    plain = tmp_path / "plain.npz"
    np.savez(plain, x=with_clusters.x_train, y=with_clusters.y_train)
    no_clusters = load_dataset(str(plain))
    assert not wants_user_pair(BootstrapConfig(dataset=str(plain)), no_clusters)
    with pytest.raises(DatasetError, match="pair models need a cluster column"):
        wants_user_pair(BootstrapConfig(dataset=str(plain), user_pair=True), no_clusters)


def test_an_examples_query_runs_the_pair_cascade_over_http(structured_server: Server) -> None:
    url = structured_server.url
    space = httpx.get(f"{url}/v1/space").json()
    assert space["num_grades"] == 3 and space["held_out_queries"] == SMALL_PAIR.queries
    seen = space["seen_by_models"]
    assert sum(p["clusters"] for p in seen.values()) == space["num_clusters"] == 300  # every cluster served
    assert seen["train"]["clusters"] > 0 and seen["pool"]["clusters"] >= SMALL_PAIR.queries
    assert space["grades"]["num_grades"] == 3 and space["grades"]["instance_auc"] >= 0.7
    held = httpx.get(f"{url}/v1/space/queries", params={"limit": 10}).json()["queries"]
    found = 0
    for q in held:
        r = httpx.post(f"{url}/v1/query", json={"target": {"examples": [q["x"]]}, "k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["mode"] == "cascade" and len(body["outputs"]) == 3
        assert [s["variant"] for s in body["stages"]] == ["pair-m25", "pair-dense"]
        ids = [c["cluster_id"] for c in body["clusters"]]
        assert len(ids) == 10 and all((i - 11) % 3 == 0 for i in ids)  # the user's cluster ids
        found += q["cluster_id"] in ids
        own = httpx.get(f"{url}/v1/clusters/{q['cluster_id']}").json()
        assert own["seen_by_models"] == "pool"  # a query's own cluster is one no model saw
    assert found >= 5  # the held-out member's own cluster is in the top 10 for most queries


def test_the_queries_command_gives_the_truth_in_the_users_ids(
    structured_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    assert main(["queries", "--home", str(structured_home), "--limit", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    data = np.load(structured_home.parent / "views.npz")
    truth = {row.tobytes(): (int(c), int(y)) for row, c, y in zip(data["x"], data["cluster"], data["y"], strict=True)}
    space_dir = structured_home / "spaces" / "default"
    queries = QuerySet.load(space_dir)
    assert queries is not None and len(lines) == 3
    for i, line in enumerate(lines):
        assert (line["truth"]["cluster_id"], line["truth"]["label"]) == truth[queries.x[i].tobytes()]


def test_a_two_grade_space_answers_examples_queries_without_gains(tmp_path: Path) -> None:
    """Structureless clusters: the bootstrap falls back to two grades, and a query that names no gains gets the
    two-grade default (never a 422 about a field the user did not send), with outputs named for two grades."""
    home = tmp_path / "home"
    config = _config(views_npz(tmp_path / "random.npz", structured=False))
    config = replace(config, pair=replace(SMALL_PAIR, listwise=replace(SMALL_PAIR.listwise, steps=100)))
    bootstrap(home, config, progress=False)
    server = start_server(home)
    try:
        url = server.url
        space = httpx.get(f"{url}/v1/space").json()
        assert space["num_grades"] == 2 and space["grades"]["gains"] == [0.0, 1.0]
        (q,) = httpx.get(f"{url}/v1/space/queries", params={"limit": 1}).json()["queries"]
        r = httpx.post(f"{url}/v1/query", json={"target": {"examples": [q["x"]]}, "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["mode"] == "cascade" and body["outputs"] == ["other", "same_label"]
        assert all(len(c["posterior"]) == 2 for c in body["clusters"])
        bad = httpx.post(f"{url}/v1/query", json={"target": {"examples": [q["x"]], "gains": [0, 1, 3]}, "k": 5})
        assert bad.status_code == 422 and "gains" in bad.text
    finally:
        stop_server(server)


def test_a_users_clusters_go_through_the_same_dev_query_check(structured_home: Path, tmp_path: Path) -> None:
    """The bootstrap's last step on a user's space: the default pair cascade is measured on its dev queries (held-
    out members), FAISS alone wherever the dense rerank does not beat it, and bootstrap.json says which and why."""
    import shutil

    from cascade.config import CONFIG_FILE, CascadeConfig
    from cascade.queries import QuerySet
    from cascade.tuner import BOOTSTRAP_RECORD, tune_home

    home = tmp_path / "home"
    shutil.copytree(structured_home, home, ignore=shutil.ignore_patterns("data"))
    result = tune_home(home)
    assert result is not None
    record = CascadeConfig.load(home / CONFIG_FILE).pair_tuning
    assert record is not None and record.dev_queries == len(QuerySet.load(home / "spaces" / "default").split("dev"))
    helps = record.dense_rerank.ndcg > record.faiss_only.ndcg
    assert record.reranker_helps == helps
    assert (CascadeConfig.load(home / CONFIG_FILE).pair_stages == ()) == (not helps or not record.chosen.stages)
    check = json.loads((home / BOOTSTRAP_RECORD).read_text())["dev_check"]
    assert check["reranker_helps"] == helps and check["why"] == record.reason
