"""The cluster reader as served (cascade/reader.py, cascade/reader_gate.py, models/cluster_reader_store.py): stored
and checked beside a tiny bootstrapped space, it reorders FAISS's top candidates at the cost the plan counts, its
grade posteriors follow from its own-cluster posterior and rank by the query's gains, it answers by default only
after a dev check of that reader under the current ranking rule chose it, a broken file never stops a snapshot, and
over HTTP a query by example says which path answered it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import TINY, start_server, stop_server
from service_fixtures import AUTH, admin_env, faiss_by_default

import cascade.reader
from cascade.config import CONFIG_FILE, READER_RULE, CascadeConfig, ReaderChoice
from cascade.embedding import EmbeddingIndex
from cascade.evaluation import example_queries
from cascade.plan import Query, execute, plan_query
from cascade.reader import LOG_FLOOR, READER_STAGE, at_confidence, grade_log_posteriors, reader_keys, serves
from cascade.reader_gate import DEV_COLUMNS, check_reader, fit_reader_temperature, sign_test
from cascade.snapshot import load_snapshot
from cascade.space import Space
from lab.reader_duel import duel
from models.cluster_reader import ReaderSpec, build_ranker
from models.cluster_reader_store import (
    READER_PREVIOUS,
    READER_SPEC,
    load_reader,
    rollback_reader,
    save_reader,
    weights_file,
)
from models.cluster_reader_training import Groups, ReaderTrainConfig, train_reader
from models.prototypes import make_prototype_set, member_set
from models.registry import ModelRegistry
from service.cli import main as cli
from service.settings import Settings
from service.state import ServiceState

SPACE = Path("spaces") / "default"


def _home_with_reader(tiny_home: Path, tmp_path: Path, opinion: float = 0.0, seed: int = 0) -> Path:
    """A copy of the tiny home with an untrained reader stored beside its space: with `opinion` 0 it ranks exactly
    as FAISS does (its last layer starts at zero); otherwise that layer is random with this scale."""
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    encoder = EmbeddingIndex.load(home / SPACE).encoder  # type: ignore[union-attr]
    spec = ReaderSpec(encoder=encoder.spec.to_dict(), d=8, dv=8, hidden=16, max_shift=6)
    torch.manual_seed(seed)
    ranker = build_ranker(spec, torch.randn(64, spec.input_dim), encoder)
    ranker.reader.init_identity()
    if opinion:
        torch.nn.init.normal_(ranker.reader.mlp[-1].weight, std=opinion)
    save_reader(ranker.eval(), spec, home / SPACE, extra={"made_by": "test"})
    return home


def _snapshot(home: Path, served: bool | None = None, candidates: int = 10):
    """The home's snapshot; `served` True or False records a dev check of its reader with that verdict."""
    path = home / CONFIG_FILE
    if served is not None:
        stored = load_reader(home / SPACE)
        assert stored is not None
        space = Space.load(home / SPACE).meta["id"]
        choice = ReaderChoice(
            served=served, sha256=stored.sha256, space=space, candidates=candidates, members=10, rule=READER_RULE
        )
        CascadeConfig.load(path).model_copy(update={"reader": choice}).save(path)
    return load_snapshot(ModelRegistry(home / "registry"), home / SPACE, CascadeConfig.load(path))


def _dev_example(snapshot, i: int = 0) -> np.ndarray:
    qs = snapshot.queries.split("dev")
    return qs.x[i : i + 1]


def test_a_stored_reader_loads_as_it_was_saved_and_a_changed_file_is_refused(tiny_home, tmp_path) -> None:
    home = _home_with_reader(tiny_home, tmp_path, opinion=0.5)
    stored = load_reader(home / SPACE)
    assert stored is not None and stored.extra == {"made_by": "test"}
    x = torch.from_numpy(_features(home))
    again = load_reader(home / SPACE)
    assert again is not None and torch.equal(stored.ranker.item_table(x[:5]), again.ranker.item_table(x[:5]))
    spec_file = home / SPACE / READER_SPEC
    original = spec_file.read_text()
    edited = json.loads(original)
    edited["spec"]["d"] = 9  # a spec edited by hand: the weights no longer fit it
    spec_file.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="does not fit its spec"):
        load_reader(home / SPACE)
    assert _snapshot(home).reader is None
    spec_file.write_text(original)
    weights = home / SPACE / weights_file(stored.sha256)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_reader(home / SPACE)
    snapshot = _snapshot(home)  # a broken reader never stops a snapshot: it is left out
    assert snapshot.reader is None and not serves(snapshot)


def _features(home: Path) -> np.ndarray:
    with np.load(home / SPACE / "space.npz") as f:
        return f["features"][:20].astype(np.float32)


OWN_CLUSTER_ONLY = [0.0, 0.0, 1.0]
"""Gains that value only the query's own cluster: the reader's answer is then its own-cluster posterior's order."""


def test_an_untrained_reader_answers_with_faiss_order_at_the_planned_cost(tiny_home, tmp_path, monkeypatch) -> None:
    snapshot = _snapshot(_home_with_reader(tiny_home, tmp_path), served=True, candidates=12)
    example = _dev_example(snapshot)
    plan = plan_query(snapshot, Query(examples=example, k=5, gains=OWN_CLUSTER_ONLY))
    assert plan.path == "reader"
    result = execute(plan, seed=0)
    faiss = execute(plan_query(snapshot, Query(examples=example, k=5, stages=[])))
    # its last layer starts at zero: the key is its multiple of the retriever's score, so FAISS's order
    assert list(result.cluster_ids) == list(faiss.cluster_ids)
    (report,) = result.stages
    assert report.variant == READER_STAGE and report.clusters_in == 12 and report.kept == 5
    sizes = np.diff(snapshot.space.offsets)[plan.target.candidates[:12]]
    assert report.items == int(np.minimum(sizes, 10).sum())
    assert result.flops == plan.stage_flops[0] == plan.flops - plan.target.flops > 0
    # the plan counted the stage's FLOPs; answering it does not count them again
    monkeypatch.setattr(cascade.reader, "planned_flops", lambda *args: pytest.fail("the FLOPs were counted twice"))
    assert execute(plan, seed=0).flops == plan.stage_flops[0]


def test_the_reader_reads_stage_0_s_own_embedding_and_counts_its_flops_cluster_by_cluster(tiny_home, tmp_path) -> None:
    snapshot = _snapshot(_home_with_reader(tiny_home, tmp_path, opinion=2.0), served=True, candidates=12)
    ranker = snapshot.reader.ranker
    for i in range(3):
        plan = plan_query(snapshot, Query(examples=_dev_example(snapshot, i), k=5))
        target = plan.target
        with torch.inference_mode():
            again = snapshot.embedding.encoder.embed(target.queries[0])
        assert torch.equal(torch.from_numpy(target.embeddings), again)  # what FAISS searched with, bit for bit
        keys = reader_keys(snapshot, target, 12, seed=i)
        assert torch.equal(keys, reader_keys(snapshot, replace(target, embeddings=None), 12, seed=i))
        moved = replace(target, embeddings=target.embeddings + 0.5)  # the residual reads the stored embedding
        assert not torch.equal(keys, reader_keys(snapshot, moved, 12, seed=i))
        sizes = np.diff(snapshot.space.offsets)[target.candidates[:12]]
        pairs = sum(ranker.reader.flops_per_pair(int(n)) for n in np.minimum(sizes, 10))
        assert plan.stage_flops[0] == ranker.query_flops() + pairs


def test_a_reader_with_an_opinion_reorders_only_faiss_top_candidates(tiny_home, tmp_path) -> None:
    snapshot = _snapshot(_home_with_reader(tiny_home, tmp_path, opinion=2.0), served=True, candidates=8)
    moved = 0
    for i in range(5):
        example = _dev_example(snapshot, i)
        result = execute(plan_query(snapshot, Query(examples=example, k=8, gains=OWN_CLUSTER_ONLY)), seed=i)
        faiss = execute(plan_query(snapshot, Query(examples=example, k=8, stages=[])))
        assert sorted(result.cluster_ids) == sorted(faiss.cluster_ids)
        assert np.all(np.diff(result.ranking_values) <= 0)
        moved += int(list(result.cluster_ids) != list(faiss.cluster_ids))
    assert moved > 0


@pytest.mark.parametrize("gains", [None, OWN_CLUSTER_ONLY, [0.0, 1.0, 1.0]])
def test_the_answer_ranks_faiss_pool_by_the_expected_gain_of_the_reader_s_grade_posteriors(
    tiny_home, tmp_path, gains
) -> None:
    snapshot = _snapshot(_home_with_reader(tiny_home, tmp_path, opinion=2.0), served=True, candidates=6)
    utility = np.asarray(gains or [0.0, 1.0, 3.0])
    for i in range(3):
        plan = plan_query(snapshot, Query(examples=_dev_example(snapshot, i), k=5, gains=gains))  # reads 6
        result = execute(plan, seed=i)
        pool = plan.target.candidates[: snapshot.config.reader.pool]
        assert set(result.cluster_ids) <= set(pool) and result.ranking == "utility_log_odds"
        assert np.allclose(result.posteriors.sum(1), 1.0, atol=1e-5)
        assert np.allclose(result.scores, result.posteriors.astype(np.float64) @ utility, atol=1e-5)
        assert np.all(np.diff(result.ranking_values) <= 0) and np.all(np.isfinite(result.ranking_values))
        unread = ~np.isin(result.cluster_ids, pool[:6])
        assert np.all(result.posteriors[unread, 2] < 1e-30)  # a cluster not read is never the query's own
        if gains == OWN_CLUSTER_ONLY:
            assert not unread.any()  # only the read ones can gain


def test_grade_posteriors_are_the_reader_s_mass_on_the_read_clusters_of_each_label() -> None:
    rng = np.random.default_rng(0)
    own = torch.log_softmax(torch.from_numpy(rng.standard_normal((2, 4))), dim=1)  # 2 examples, 4 clusters read
    read, pool = np.array([3, 1, 3, 2]), np.array([3, 1, 3, 2, 1, 5])
    p = own.exp().numpy()
    for grades in (3, 2):
        got = grade_log_posteriors(own, read, pool, grades).exp().numpy()
        want = np.zeros((len(pool), grades))
        for e in range(2):
            for c, label in enumerate(pool):
                mine = p[e, c] if c < len(read) else 0.0
                same = p[e, read == label].sum()
                row = [1 - same, same - mine, mine] if grades == 3 else [1 - same, same]
                want[c] += np.asarray(row) / 2
        assert np.allclose(got, want, atol=1e-12)
        assert np.allclose(got.sum(1), 1.0)
    floor = grade_log_posteriors(own, read, pool, 3)
    assert floor[5, 1] == floor[5, 2] == LOG_FLOOR  # label 5 was never read: finite, at the floor
    with pytest.raises(ValueError, match="2 or 3"):
        grade_log_posteriors(own, read, pool, 4)


def test_the_reader_answers_by_default_only_after_a_dev_check_of_that_reader_chose_it(tiny_home, tmp_path) -> None:
    home = _home_with_reader(tiny_home, tmp_path)
    example = None
    for served, path in ((None, "cascade"), (False, "cascade"), (True, "reader")):
        snapshot = _snapshot(home, served=served)
        example = _dev_example(snapshot) if example is None else example
        assert plan_query(snapshot, Query(examples=example)).path == path
    assert plan_query(snapshot, Query(examples=example, mode="cascade")).path == "cascade"
    assert plan_query(snapshot, Query(examples=example, stages=[])).path == "faiss"
    assert plan_query(snapshot, Query(label=3)).path != "reader"
    other = replace(snapshot, reader=replace(snapshot.reader, sha256="0" * 64))  # another reader, never checked
    assert not serves(other) and plan_query(other, Query(examples=example)).path == "cascade"
    elsewhere = replace(snapshot, space=replace(snapshot.space, meta={**snapshot.space.meta, "id": "another"}))
    assert not serves(elsewhere)  # checked on another space of the home
    before_rules = snapshot.config.reader.model_copy(update={"rule": ""})
    older = replace(snapshot, config=snapshot.config.model_copy(update={"reader": before_rules}))
    assert not serves(older)  # a verdict on another ranking rule says nothing about this one


def test_the_dev_check_keeps_faiss_when_the_reader_is_worse(tiny_home, tmp_path) -> None:
    home = _home_with_reader(tiny_home, tmp_path, opinion=5.0, seed=3)
    snapshot = _snapshot(home)
    choice = check_reader(snapshot, candidates=10)
    dev = choice.dev
    assert dev["queries"] == len(snapshot.queries.split("dev"))
    assert dev["reader"]["recall_at_1"] < dev["faiss"]["recall_at_1"]  # a random opinion loses to FAISS
    assert not choice.served and "not served" in choice.reason
    # the default it would replace is measured on the same queries (the tiny home's is a pair cascade)
    assert dev["cascade"]["flops"] > dev["faiss"]["flops"] and "the default pair cascade" in choice.reason
    assert dev["reader"]["flops"] > dev["faiss"]["flops"]
    # a random opinion is sure of itself: the temperature fitted on the dev queries softens it
    calibration = dev["calibration"]
    assert choice.temperature == calibration["temperature"] > 1 and choice.rule == READER_RULE
    assert calibration["nll_after"] < calibration["nll_before"]
    # cross-fitted: each half of the dev queries is answered at the temperature fitted on the other half alone
    on_odd, on_even = dev["temperature_fitted_on_odd_even"]
    reading = choice.model_copy(update={"served": False, "temperature": 1.0})
    measured = replace(snapshot, config=snapshot.config.model_copy(update={"reader": reading}))
    held_out = example_queries(measured, max(snapshot.config.pair_candidates or 200, 10, choice.pool), None, "dev")
    assert on_odd == pytest.approx(fit_reader_temperature(measured, held_out[1::2], 10)["temperature"], rel=1e-3)
    assert on_even == pytest.approx(fit_reader_temperature(measured, held_out[0::2], 10)["temperature"], rel=1e-3)
    assert f"{on_odd:.3g}" in choice.reason and f"{on_even:.3g}" in choice.reason
    # the command stores the verdict; the snapshot then keeps the default pair cascade
    assert cli(["reader", "--home", str(home), "--check"]) == 0
    stored = CascadeConfig.load(home / CONFIG_FILE).reader
    assert stored is not None and stored.served is False
    for name in ("faiss", "reader", "cascade"):  # measured again: the same answers (times differ)
        assert {k: v for k, v in stored.dev[name].items() if k != "ms_median"} == {
            k: v for k, v in dev[name].items() if k != "ms_median"
        }
    assert plan_query(_snapshot(home), Query(examples=_dev_example(snapshot))).path == "cascade"


def test_the_dev_check_needs_two_queries_in_each_half_it_cross_fits_on(tiny_home, tmp_path) -> None:
    snapshot = _snapshot(_home_with_reader(tiny_home, tmp_path, opinion=1.0))
    with pytest.raises(ValueError, match="needs at least 4"):
        check_reader(snapshot, candidates=10, queries=3)
    assert check_reader(snapshot, candidates=10, queries=4).dev["queries"] == 4


def test_a_reader_that_keeps_faiss_order_wins_nothing_on_recall_and_serves_only_for_a_sure_ndcg_win(
    tiny_home, tmp_path
) -> None:
    # An untrained reader's keys are FAISS's own scores: its first cluster is FAISS's on every query. Its answer still
    # ranks FAISS's pool by expected gain (the keys' label mass), which may order the same-label clusters better
    # than FAISS does; whether 20 dev queries make that sure depends on the tiny home (it differs between CPUs).
    choice = check_reader(_snapshot(_home_with_reader(tiny_home, tmp_path)), candidates=10)
    dev = choice.dev
    assert dev["reader"]["recall_at_1"] == dev["faiss"]["recall_at_1"]
    for duels in dev["wins_losses"].values():
        assert duels["recall_at_1"] == {"wins": 0, "losses": 0, "p_value": 1.0}  # no evidence either way
    others = list(dev["wins_losses"])
    sure = all(dev["reader"][m] >= dev[o][m] for o in others for m in ("recall_at_1", "ndcg_at_10")) and all(
        dev["wins_losses"][o]["ndcg_at_10"]["p_value"] <= dev["alpha_per_metric"] for o in others
    )
    assert choice.served == sure
    assert ("served by default" in choice.reason) == sure


def test_training_reads_the_retriever_lists_and_stores_a_servable_reader(tiny_home, tmp_path) -> None:
    encoder = EmbeddingIndex.load(tiny_home / SPACE).encoder  # type: ignore[union-attr]
    train = make_prototype_set(TINY.pair.train, "train")
    held = make_prototype_set(replace(TINY.pair.train, num_prototypes=60), "val")
    spec = ReaderSpec(encoder=encoder.spec.to_dict(), d=8, dv=8, hidden=16, max_shift=6)
    rows: list[dict] = []
    config = ReaderTrainConfig(steps=12, alone_steps=8, batch=4, group=4, top=8)
    model, record = train_reader(spec, encoder, train, held, config, rows.append, every=4)
    assert [r["step"] for r in rows] == [4, 8, 12] and record["trajectory"] == rows
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert float(model.reader.mlp[-1].weight.detach().abs().sum()) > 0  # it learnt something beyond the retriever
    # the residual's multiple serves as fitted on the held-out clusters' lists (a point of fit_alpha's grid), not
    # as trained on clusters the retriever itself was trained on
    alpha = model.reader.log_alpha.exp().item()
    assert record["alpha_served"] == pytest.approx(alpha, rel=1e-4) != record["alpha_trained"]
    assert np.log(alpha) / np.log(1000.0) * 60 == pytest.approx(round(np.log(alpha) / np.log(1000.0) * 60), abs=1e-3)
    as_trained, kept = train_reader(spec, encoder, train, held, replace(config, held_out_alpha=False))
    assert kept["alpha_served"] == kept["alpha_trained"] == pytest.approx(record["alpha_trained"], rel=1e-4)
    assert as_trained.reader.log_alpha.exp().item() == pytest.approx(record["alpha_trained"], rel=1e-4)
    before = [p.clone() for p in encoder.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters(), strict=True))  # the retriever is kept
    digest = save_reader(model, spec, tmp_path, extra=record)
    assert load_reader(tmp_path).sha256 == digest
    few = make_prototype_set(replace(TINY.pair.train, num_prototypes=8), "val")  # fewer clusters than top + 1
    with pytest.raises(ValueError, match="held-out set has 8 clusters"):
        train_reader(spec, encoder, train, few, config)
    with pytest.raises(ValueError, match="1 to top = 8 others"):
        train_reader(spec, encoder, train, held, replace(config, group=10))


def test_http_a_query_by_example_says_the_reader_answered_and_the_space_says_why(tiny_home, tmp_path) -> None:
    home = _home_with_reader(tiny_home, tmp_path, opinion=0.5)
    snapshot = _snapshot(home, served=True)
    example = _dev_example(snapshot)[0].tolist()
    server = start_server(home)
    try:
        body = {"target": {"examples": [example]}, "k": 3}
        r = httpx.post(f"{server.url}/v1/query", json=body, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["mode"] == "reader" and out["ranking"] == "utility_log_odds" and len(out["clusters"]) == 3
        assert out["stages"][0]["variant"] == READER_STAGE and out["flops"] == out["stages"][0]["flops"]
        batch = httpx.post(f"{server.url}/v1/query/batch", json={"queries": [body, body]}, timeout=30)
        assert batch.status_code == 200, batch.text
        for answer in batch.json()["results"]:  # each as it is answered alone
            assert answer["mode"] == "reader"
            assert [c["cluster_id"] for c in answer["clusters"]] == [c["cluster_id"] for c in out["clusters"]]
        r = httpx.post(f"{server.url}/v1/query", json={**body, "mode": "cascade"}, timeout=30)
        assert r.status_code == 200 and r.json()["mode"] == "cascade"
        space = httpx.get(f"{server.url}/v1/space", timeout=30).json()
        assert space["reader"]["served"] is True and space["reader"]["sha256"] == snapshot.reader.sha256
        assert any(e["key"].startswith("reader:") for e in space["item_cache"])
        cascade = httpx.get(f"{server.url}/v1/cascade", timeout=30).json()
        assert cascade["reader"]["served"] is True and cascade["reader"]["sha256"] == snapshot.reader.sha256
    finally:
        stop_server(server)


def test_the_command_trains_stores_and_checks_a_reader_on_the_home_s_training_prototypes(
    tiny_home, tmp_path, capsys
) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    assert cli(["reader", "--home", str(home), "--confidence", "1"]) == 2  # refused before any training
    assert cli(["reader", "--home", str(home), "--candidates", "0"]) == 2
    assert load_reader(home / SPACE) is None
    assert cli(["reader", "--home", str(home), "--steps", "3", "--alone-steps", "2", "--dev-queries", "6"]) == 0
    stored = load_reader(home / SPACE)
    assert stored is not None and stored.extra["config"]["steps"] == 3
    # trained on the lists it reads: its own cluster and the whole of FAISS's top 10 (the check's width)
    assert (stored.extra["config"]["top"], stored.extra["config"]["group"]) == (10, 11)
    # trained on the tiny home's own training prototypes, as its bootstrap record says
    assert stored.extra["train_clusters"] == TINY.pair.train.num_prototypes
    choice = CascadeConfig.load(home / CONFIG_FILE).reader
    assert choice is not None and choice.sha256 == stored.sha256 and choice.dev["queries"] == 6
    assert "dev queries" in capsys.readouterr().out
    # the check's rows, query by query: they add up to its means and its wins and losses
    rows = tmp_path / "rows.npz"
    assert cli(["reader", "--home", str(home), "--check", "--dev-queries", "6", "--per-query", str(rows)]) == 0
    table = np.load(rows)
    assert list(table["columns"]) == list(DEV_COLUMNS) and str(table["sha256"]) == stored.sha256
    assert table["reader"].shape == table["faiss"].shape == (6, len(DEV_COLUMNS)) and len(table["query_cluster"]) == 6
    dev = CascadeConfig.load(home / CONFIG_FILE).reader.dev
    for name in ("reader", "faiss"):
        assert table[name][:, 0].mean() == pytest.approx(dev[name]["recall_at_1"], abs=1e-4)
    r1 = duel(table["reader"][:, 0], table["faiss"][:, 0])
    assert r1["a_wins_losses"] == [dev["wins_losses"]["faiss"]["recall_at_1"][s] for s in ("wins", "losses")]


@pytest.mark.parametrize(
    "bad, named",
    [
        ("width=8", "not 'width=8'"),
        ("dv", "not 'dv'"),
        ("dv=wide", "dv must be an integer, not 'wide'"),
        ("context=4", "odd kernel size"),
        ("hidden=0", "hidden must be positive"),
    ],
)
def test_the_command_refuses_a_shape_it_cannot_build_before_training(tiny_home, tmp_path, capsys, bad, named) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    assert cli(["reader", "--home", str(home), "--steps", "3", "--shape", bad]) == 2
    assert load_reader(home / SPACE) is None  # nothing trained, nothing stored
    assert named in capsys.readouterr().err


def test_the_command_trains_a_reader_of_the_shape_it_is_given(tiny_home, tmp_path) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    shape = ["d=8", "dv=4", "hidden=8", "context=3"]
    assert (
        cli(
            [
                "reader",
                "--home",
                str(home),
                "--steps",
                "2",
                "--alone-steps",
                "1",
                "--dev-queries",
                "4",
                "--shape",
                *shape,
            ]
        )
        == 0
    )
    stored = load_reader(home / SPACE)
    assert stored is not None
    assert (stored.spec.d, stored.spec.dv, stored.spec.hidden, stored.spec.context) == (8, 4, 8, 3)
    assert cli(["reader", "--home", str(home), "--check", "--shape", "d=8"]) == 2  # the check reads the stored shape


def test_on_a_user_s_clusters_a_query_is_a_held_out_member_never_read_as_its_own(tiny_home) -> None:
    encoder = EmbeddingIndex.load(tiny_home / SPACE).encoder  # type: ignore[union-attr]
    rng = np.random.default_rng(0)
    sizes = [4, 5, 6] * 4
    cluster = np.repeat(np.arange(len(sizes)), sizes)
    data = member_set(rng.standard_normal((len(cluster), 40)).astype(np.float32), cluster % 3, cluster)
    groups = Groups(data, encoder)
    assert groups.views == 3  # the smallest cluster less the held-out query
    q, members, rs, ids = groups.sample_with_ids(16, 4, 6, np.random.default_rng(1))
    assert members.shape == (16, 4, 3, 40) and ids.shape == (16, 4)
    x = torch.from_numpy(data.x)
    for i in range(16):
        (row,) = torch.nonzero((x == q[i]).all(1)).flatten().tolist()
        own = np.flatnonzero(data.cluster == data.cluster[row])
        read = [int(torch.nonzero((x == m).all(1)).item()) for m in members[i, 0]]
        assert row not in read and set(read) <= set(own) and len(set(read)) == 3
        # the ids name the clusters read, the query's own first
        for j in range(4):
            rows = [int(torch.nonzero((x == m).all(1)).item()) for m in members[i, j]]
            assert set(data.cluster[rows]) == {ids[i, j]}
        assert ids[i, 0] == data.cluster[row]
        with torch.no_grad():
            e = encoder.embed(q[i : i + 1]).double()
            rest = encoder.embed(x[[r for r in own if r != row]]).double().mean(0)
        assert rs[i, 0].item() == pytest.approx(-float(((e[0] - rest) ** 2).sum()), abs=1e-5)


def test_a_new_reader_replaces_the_old_in_one_step_and_a_half_written_one_is_never_read(tiny_home, tmp_path) -> None:
    encoder = EmbeddingIndex.load(tiny_home / SPACE).encoder  # type: ignore[union-attr]
    spec = ReaderSpec(encoder=encoder.spec.to_dict(), d=8, dv=8, hidden=16, max_shift=6)
    first = save_reader(build_ranker(spec, torch.randn(32, spec.input_dim), encoder), spec, tmp_path)
    (tmp_path / weights_file("f" * 64)).write_bytes(b"a save that died before its spec was written")
    assert load_reader(tmp_path).sha256 == first  # the spec still names the complete pair
    second = save_reader(build_ranker(spec, torch.randn(32, spec.input_dim), encoder), spec, tmp_path)
    assert second != first and load_reader(tmp_path).sha256 == second
    # the half-written file goes; the first is kept as the previous reader (for a rollback)
    assert {p.name for p in tmp_path.glob("reader-*.safetensors")} == {weights_file(first), weights_file(second)}


def test_reload_adopts_a_reader_stored_while_the_server_ran_but_not_a_broken_one(tiny_home, tmp_path) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)  # no reader at start
    example = _dev_example(_snapshot(home))[0].tolist()
    body = {"target": {"examples": [example]}, "k": 3}
    server = start_server(home, admin_env())
    try:
        assert httpx.post(f"{server.url}/v1/query", json=body, timeout=30).json()["mode"] != "reader"
        assert httpx.get(f"{server.url}/v1/space", timeout=30).json()["reader"] is None
        stored = _home_with_reader(tiny_home, tmp_path / "elsewhere", opinion=0.5) / SPACE
        for f in [READER_SPEC, *(p.name for p in stored.glob("reader-*.safetensors"))]:
            shutil.copy(stored / f, home / SPACE / f)  # as `prunecascade reader` leaves them, with its verdict
        _snapshot(home, served=True)
        r = httpx.post(f"{server.url}/v1/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert set(r.json()["changed"]) == {"reader", "cascade"}
        space = httpx.get(f"{server.url}/v1/space", timeout=30).json()
        assert space["reader"]["served"] is True and space["reader"]["sha256"] == load_reader(home / SPACE).sha256
        assert httpx.post(f"{server.url}/v1/query", json=body, timeout=30).json()["mode"] == "reader"
        assert httpx.post(f"{server.url}/v1/admin/reload", headers=AUTH, timeout=60).json()["changed"] == []
        served = load_reader(home / SPACE).sha256
        spec = json.loads((home / SPACE / READER_SPEC).read_text())
        (home / SPACE / weights_file("e" * 64)).write_bytes(b"not the weights the spec names")
        (home / SPACE / READER_SPEC).write_text(
            json.dumps({**spec, "sha256": "e" * 64, "weights": weights_file("e" * 64)})
        )
        # a new reader that does not load is logged and left out: the one being served stays
        assert httpx.post(f"{server.url}/v1/admin/reload", headers=AUTH, timeout=60).json()["changed"] == []
        assert httpx.get(f"{server.url}/v1/space", timeout=30).json()["reader"]["sha256"] == served
        assert httpx.post(f"{server.url}/v1/query", json=body, timeout=30).json()["mode"] == "reader"
        (home / SPACE / READER_SPEC).unlink()  # removed: no reader any more
        assert httpx.post(f"{server.url}/v1/admin/reload", headers=AUTH, timeout=60).json()["changed"] == ["reader"]
        assert httpx.get(f"{server.url}/v1/space", timeout=30).json()["reader"] is None
        assert httpx.post(f"{server.url}/v1/query", json=body, timeout=30).json()["mode"] != "reader"
    finally:
        stop_server(server)


def test_a_replaced_reader_is_kept_for_a_rollback_and_older_ones_go(tiny_home, tmp_path) -> None:
    encoder = EmbeddingIndex.load(tiny_home / SPACE).encoder  # type: ignore[union-attr]
    spec = ReaderSpec(encoder=encoder.spec.to_dict(), d=8, dv=8, hidden=16, max_shift=6)

    def new_reader() -> object:
        return build_ranker(spec, torch.randn(32, spec.input_dim), encoder)

    with pytest.raises(LookupError, match="no previous"):
        rollback_reader(tmp_path, None)
    first = save_reader(new_reader(), spec, tmp_path)
    second = save_reader(new_reader(), spec, tmp_path, check={"served": True, "sha256": first})
    assert load_reader(tmp_path).sha256 == second and load_reader(tmp_path, READER_PREVIOUS).sha256 == first
    third = save_reader(new_reader(), spec, tmp_path, check=None)
    assert load_reader(tmp_path, READER_PREVIOUS).sha256 == second
    assert {p.name for p in tmp_path.glob("reader-*.safetensors")} == {weights_file(second), weights_file(third)}
    restored, check = rollback_reader(tmp_path, {"served": True, "sha256": third})
    assert restored == second and check is None  # it was replaced with no check kept
    assert load_reader(tmp_path).sha256 == second and load_reader(tmp_path, READER_PREVIOUS).sha256 == third
    assert rollback_reader(tmp_path, None) == (third, {"served": True, "sha256": third})  # and back again
    (tmp_path / weights_file(second)).write_bytes(b"broken")
    with pytest.raises(ValueError, match="sha256"):
        rollback_reader(tmp_path, None)  # a broken previous reader: nothing moves
    assert load_reader(tmp_path).sha256 == third


@pytest.fixture(scope="module")
def trained_home(tiny_home, tmp_path_factory) -> Path:
    """A copy of the tiny home (FAISS alone its default) with a reader trained 50 steps on its training prototypes,
    served by its dev check (`faiss_by_default`)."""
    home = tmp_path_factory.mktemp("trained") / "home"
    shutil.copytree(tiny_home, home)
    faiss_by_default(home)
    assert cli(["reader", "--home", str(home), "--steps", "50"]) == 0
    assert CascadeConfig.load(home / CONFIG_FILE).reader.served
    return home


@pytest.fixture(scope="module")
def trained_reader(trained_home) -> tuple[bytes, bytes, str]:
    """That reader's spec file, weights and sha256."""
    stored = load_reader(trained_home / SPACE)
    assert stored is not None
    spec = (trained_home / SPACE / READER_SPEC).read_bytes()
    return spec, (trained_home / SPACE / weights_file(stored.sha256)).read_bytes(), stored.sha256


def test_the_sign_test_is_the_binomial_tail_and_a_check_recorded_without_it_compared_means() -> None:
    assert sign_test(0, 0) == 1.0  # never different: no evidence
    assert sign_test(2, 1) == 0.5  # 4 of the 8 outcomes of 3 fair flips have at least 2 heads
    assert sign_test(5, 0) == 1 / 32 and sign_test(0, 5) == 1.0
    assert sign_test(42, 14) < 1e-3
    for n in range(1, 12):  # p <= 0.5 is exactly "more won than lost"
        for wins in range(n + 1):
            assert (sign_test(wins, n - wins) <= 0.5) == (wins > n - wins)
    recorded_before = ReaderChoice.model_validate({"served": True, "sha256": "0" * 64})
    assert recorded_before.confidence == 0.5


def test_the_dev_check_serves_only_a_win_its_queries_are_sure_of(trained_home) -> None:
    snapshot = _snapshot(trained_home)
    for confidence, queries in ((0.5, None), (0.95, None), (0.95, 4)):
        choice = check_reader(snapshot, candidates=10, queries=queries, confidence=confidence)
        dev, alpha = choice.dev, (1 - confidence) / 2  # split over recall@1 and nDCG@10
        assert choice.confidence == confidence and dev["alpha_per_metric"] == pytest.approx(alpha)
        duels = dev["wins_losses"]["faiss"]
        assert set(duels) == {"recall_at_1", "ndcg_at_10"}
        for d in duels.values():
            assert d["p_value"] == pytest.approx(sign_test(d["wins"], d["losses"]), rel=1e-2)
        no_lower = all(dev["reader"][m] >= dev["faiss"][m] for m in duels)
        assert choice.served == (no_lower and min(d["p_value"] for d in duels.values()) <= alpha)
        if queries == 4:  # four queries are no evidence: 4 wins of 4 is p = 1/16, above 0.025
            assert no_lower and not choice.served and "not served" in choice.reason
    with pytest.raises(ValueError, match="confidence"):
        check_reader(snapshot, candidates=10, confidence=1.0)


def test_a_service_stricter_than_the_check_judges_it_again_from_its_sign_tests(trained_home, tmp_path) -> None:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    recorded = CascadeConfig.load(home / CONFIG_FILE).reader
    assert recorded.served and recorded.confidence == 0.95
    best = min(d["p_value"] for duels in recorded.dev["wins_losses"].values() for d in duels.values())

    def served(confidence: float) -> tuple[bool, list[str], ReaderChoice]:
        state = ServiceState(Settings(home=home, reader_confidence=confidence))
        snapshot = state.load()
        return serves(snapshot), state.warnings_for(snapshot, "pair"), snapshot.config.reader

    assert served(0.95)[:2] == (True, [])
    assert served(max(0.95, 1 - 4 * best))[:2] == (True, [])  # its best sign test still reaches p <= alpha
    ok, warnings, choice = served(1 - best)  # alpha = best / 2: no sign test reaches it
    assert not ok and choice.reason.startswith("not served at this service's confidence")
    assert any("not served" in w for w in warnings)
    assert CascadeConfig.load(home / CONFIG_FILE).reader == recorded  # judged in memory; the record stays as it was
    # a check recorded before the sign tests cannot be judged again: it serves on, and every answer says so
    means_only = recorded.model_copy(update={"confidence": 0.5, "dev": {}})
    CascadeConfig.load(home / CONFIG_FILE).model_copy(update={"reader": means_only}).save(home / CONFIG_FILE)
    ok, warnings, _ = served(0.95)
    assert ok and any("prunecascade reader --check" in w for w in warnings)
    assert at_confidence(means_only, 0.5) == (means_only, None)
    refused = recorded.model_copy(update={"served": False})
    assert at_confidence(refused, 0.999) == (refused, None)  # a lower or higher bar never serves a refused reader


def test_http_an_uploaded_reader_is_checked_before_it_serves_and_rolls_back(
    tiny_home, tmp_path, trained_reader
) -> None:
    spec, weights, digest = trained_reader
    home = faiss_by_default(_home_with_reader(tiny_home, tmp_path))  # an untrained reader, served under a check
    first = _snapshot(home, served=True).reader.sha256
    example = _dev_example(_snapshot(home))[0].tolist()
    query = {"target": {"examples": [example]}, "k": 3}
    server = start_server(home, admin_env())
    url = f"{server.url}/v1/admin/reader"

    def upload(spec_bytes: bytes, weights_bytes: bytes, headers: dict = AUTH) -> httpx.Response:
        files = {"spec": ("reader.json", spec_bytes), "weights": ("reader.safetensors", weights_bytes)}
        return httpx.post(url, files=files, headers=headers, timeout=120)

    def served() -> dict:
        return httpx.get(f"{server.url}/v1/space", timeout=30).json()["reader"]

    try:
        assert served()["previous"] is None
        assert upload(spec, weights, headers={}).status_code == 401
        other = json.loads(spec)
        other["spec"]["encoder"] = {**other["spec"]["encoder"], "embed_dim": 3}
        worse = _home_with_reader(tiny_home, tmp_path / "random", opinion=5.0, seed=3) / SPACE  # loses to FAISS
        worse_weights = (worse / weights_file(load_reader(worse).sha256)).read_bytes()
        refusals = [
            (b"{not json", weights, "spec", "not JSON"),
            (json.dumps({"spec": {"d": 8}}).encode(), weights, "spec", "not a cluster reader's spec"),
            (json.dumps(other).encode(), weights, "spec.encoder", "another retriever"),
            (spec, b"\x80\x04pickle", "weights", "sha256"),
            (json.dumps({"spec": json.loads(spec)["spec"]}).encode(), b"\x80\x04pickle", "weights", "safetensors"),
            ((worse / READER_SPEC).read_bytes(), worse_weights, "weights", "dev check keeps"),
        ]
        # larger than a query's body limit (1 MB), within the upload limit: it reaches the checks, as a model does
        padded = json.dumps({**json.loads(spec), "extra": {"notes": "x" * 1_200_000}}).encode()
        refusals.append((padded, b"\x80\x04pickle", "weights", "sha256"))
        for spec_bytes, weights_bytes, field, words in refusals:
            r = upload(spec_bytes, weights_bytes)
            assert r.status_code == 422, r.text
            (detail,) = r.json()["detail"]
            assert ".".join(detail["loc"][1:]) == field and words in detail["msg"], r.text
            assert served()["sha256"] == first and served()["served"] is True  # nothing changed
        r = upload(spec, weights)
        assert r.status_code == 201, r.text
        assert r.json()["sha256"] == digest and r.json()["served"] is True and r.json()["check"]["sha256"] == digest
        assert served()["sha256"] == digest and served()["previous"] == first
        assert httpx.post(f"{server.url}/v1/query", json=query, timeout=30).json()["mode"] == "reader"
        assert upload(spec, weights).status_code == 200  # the same weights again: nothing changes
        back = httpx.post(f"{url}/rollback", headers=AUTH, timeout=60)
        assert back.status_code == 200, back.text
        assert back.json()["sha256"] == first and back.json()["served"] is True  # under the check it had
        assert served()["sha256"] == first
        again = httpx.post(f"{url}/rollback", headers=AUTH, timeout=60).json()
        assert again["sha256"] == digest and again["check"]["sha256"] == digest
    finally:
        stop_server(server)
    assert load_reader(home / SPACE).sha256 == digest  # on disk as served
    assert CascadeConfig.load(home / CONFIG_FILE).reader.sha256 == digest


def test_http_an_upload_to_a_space_without_dev_queries_is_refused_and_nothing_is_stored(
    tiny_home, tmp_path, trained_reader
) -> None:
    spec, weights, _ = trained_reader
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    (home / SPACE / "queries.npz").unlink()  # a user's space shipped without held-out queries
    server = start_server(home, admin_env())
    try:
        files = {"spec": ("reader.json", spec), "weights": ("reader.safetensors", weights)}
        r = httpx.post(f"{server.url}/v1/admin/reader", files=files, headers=AUTH, timeout=120)
        assert r.status_code == 409, r.text
        assert "cannot be checked on this space" in r.text and "held-out queries" in r.text
        assert httpx.get(f"{server.url}/v1/space", timeout=30).json()["reader"] is None
    finally:
        stop_server(server)
    assert not (home / SPACE / READER_SPEC).exists() and not list((home / SPACE).glob("reader-*"))


def test_a_quality_is_answered_by_the_reader_where_it_dominates_the_plan_picked(tiny_home, tmp_path) -> None:
    from cascade.plan import Query, plan_query, quality_note
    from cascade.tuning_record import PlanPoint, TuneTarget, TuningRecord

    def point(name: str, rel: float, r1: float, ndcg: float, flops: float) -> PlanPoint:
        return PlanPoint(
            name=name, candidates=10, stages=(), rel_ndcg=rel, rel_ndcg_low=rel, agreement=rel, recall_at_1=r1,
            ndcg=ndcg, flops=flops, ms=1.0, queries=20,
        )  # fmt: skip

    faiss, cheap, dear = (
        point("faiss", 0.9, 0.5, 0.8, 1e5),
        point("cheap", 0.95, 0.55, 0.85, 1e6),
        point("dear", 0.99, 0.6, 0.9, 1e7),
    )
    record = TuningRecord(
        target=TuneTarget(kind="quality", value=0.99), chosen=dear, reason="test", reranker_helps=True,
        faiss_only=faiss, dense_rerank=dear, oracle={"flops": 1e9}, front=(faiss, cheap, dear), dev_queries=20,
        split_rule="test", models={}, space="test", date="2026-12-03", tuner={},
    )  # fmt: skip
    home = _home_with_reader(tiny_home, tmp_path)
    path = home / CONFIG_FILE
    CascadeConfig.load(path).model_copy(update={"pair_tuning": record}).save(path)
    example = _dev_example(_snapshot(home))

    def answered(quality: float, reader: dict | None = None, mode: str = "auto") -> tuple[str, str | None]:
        if reader is not None:
            dev = {"reader": reader, "faiss": {"recall_at_1": 0.6, "ndcg_at_10": 0.9}}
            choice = CascadeConfig.load(path).reader.model_copy(update={"dev": dev})
            CascadeConfig.load(path).model_copy(update={"reader": choice}).save(path)
        snapshot = _snapshot(home)
        answer = plan_query(snapshot, Query(examples=example, quality=quality, mode=mode)).path
        return answer, quality_note(snapshot, quality, answer)

    # no check: the reader is not the default, and a quality runs the plan it picks, with no note
    assert answered(0.94) == ("faiss", None)  # the points' stage lists are [] (FAISS alone)
    _snapshot(home, served=True)
    # better on dev but dearer than the plan picked: the plan answers, and the note names both
    path_, note = answered(0.94, {"recall_at_1": 0.75, "ndcg_at_10": 0.95, "flops": 5e6})
    assert path_ == "faiss" and note is not None
    assert "picks cheap" in note and "dev recall@1 0.550" in note and "dev recall@1 0.750, nDCG@10 0.950" in note
    assert "leave out quality" in note
    # the dearer plan of a higher quality is dominated: better on both counts at fewer FLOPs, the reader answers
    path_, note = answered(0.99)
    assert path_ == "reader" and note is not None and "picks dear" in note and "so the reader answered" in note
    assert answered(0.99, mode="cascade")[0] == "faiss"  # a query that asks for the pair cascade gets it
    # worse on one count (nDCG@10 under the plan's): not dominated
    assert answered(0.99, {"recall_at_1": 0.75, "ndcg_at_10": 0.89, "flops": 5e6})[0] == "faiss"
    # a check recorded before the reader's FLOPs were: never dominates
    assert answered(0.99, {"recall_at_1": 0.75, "ndcg_at_10": 0.95})[0] == "faiss"
    _snapshot(home, served=False)  # a reader its check did not choose
    assert answered(0.99) == ("faiss", None)
