"""Pair tuples and gadgets over pair-model hidden states: the tuples' grades, gadget
training on the tiny bootstrapped pair model, the `gadget` command storing a gadget that the engine serves, and the
refusal of a gadget that does not fit the variant."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.config import CONFIG_FILE, CascadeConfig, Stage
from cascade.plan import run_cascade, target_from_examples
from cascade.snapshot import load_snapshot
from lab.pair_tuples import pair_variant, run_pair_experiment
from lab.tuples import DEFAULT_AGGREGATORS
from models.aggregation import aggregate, log_prior_of
from models.gadget import GadgetSpec, build_gadget, gadget_misfit
from models.gadget_training import GadgetTrainConfig
from models.pair import PairNetwork
from models.pair_gadget_training import (
    draw_from_pool,
    pair_tuple_outputs,
    pair_tuple_outputs_many,
    sample_pair_tuples,
    store_pair_gadget,
    train_gadget_for,
    train_pair_gadget,
)
from models.prototypes import PrototypeConfig, grades, make_prototypes, make_views
from models.registry import ModelRegistry
from service.cli import main

PRIOR = (0.2, 0.4, 0.4)


def _protos(**kw: object) -> object:
    return make_prototypes(PrototypeConfig(num_prototypes=60, **kw), "val")  # type: ignore[arg-type]


def test_tuple_grades_are_correct_and_every_member_is_a_view_of_the_cluster() -> None:
    """Noise-free, jitter-free views: each member must be exactly the cluster prototype's rendering, the query
    its own prototype's, and the grade the project definition of (query prototype, cluster prototype)."""
    protos = _protos(jitter=0, corr_noise_scale=0.0, iid_noise_scale=0.0)
    t = sample_pair_tuples(protos, 300, 5, PRIOR, seed=3)
    clean = make_views(protos, np.arange(len(protos)), np.random.default_rng(0))
    assert t.members.shape == (300, 5, 40) and t.queries.shape == (300, 40)
    np.testing.assert_allclose(t.members.numpy(), clean[np.repeat(t.cluster_ids, 5)].reshape(300, 5, 40), atol=1e-5)
    np.testing.assert_allclose(t.queries.numpy(), clean[t.query_ids], atol=1e-5)
    expected = grades(t.query_ids, protos.digit[t.query_ids], t.cluster_ids, protos.digit[t.cluster_ids])
    assert np.array_equal(t.grades.numpy(), np.diagonal(expected))
    assert set(np.unique(t.grades.numpy())) == {0, 1, 2}


def test_tuple_grades_follow_the_prior_and_views_are_fresh() -> None:
    protos = _protos()
    t = sample_pair_tuples(protos, 3000, 4, PRIOR, seed=0)
    freq = np.bincount(t.grades.numpy(), minlength=3) / 3000
    np.testing.assert_allclose(freq, PRIOR, atol=0.03)
    assert not torch.equal(t.members[:, 0], t.members[:, 1])  # fresh noise per member
    again = sample_pair_tuples(protos, 3000, 4, PRIOR, seed=0)
    assert torch.equal(t.members, again.members) and torch.equal(t.grades, again.grades)  # deterministic in seed
    balanced = sample_pair_tuples(protos, 3000, 1, (1, 1, 1), seed=1)
    np.testing.assert_allclose(np.bincount(balanced.grades.numpy(), minlength=3) / 3000, 1 / 3, atol=0.03)
    with pytest.raises(ValueError, match="grade_prior"):
        sample_pair_tuples(protos, 10, 2, (0.5, 0.5), seed=0)


def test_pool_draws_are_distinct_members_of_one_tuple() -> None:
    protos = _protos()
    t = sample_pair_tuples(protos, 50, 6, PRIOR, seed=0)
    hidden = torch.arange(50 * 6, dtype=torch.float32).reshape(50, 6, 1)  # row r of tuple i holds 6 i + r
    from models.pair_gadget_training import PairTupleOutputs

    pool = PairTupleOutputs(torch.zeros(50, 6, 3), hidden, t.grades)
    counts = torch.tensor([1, 6, 3, 4])
    rows, labels = draw_from_pool(pool)(counts, torch.Generator().manual_seed(0))
    assert rows.shape == (14, 1)
    start = 0
    for c, y in zip(counts.tolist(), labels.tolist(), strict=True):
        values = rows[start : start + c, 0].long()
        tuple_ids = values // 6
        assert len(set(tuple_ids.tolist())) == 1 and len(set(values.tolist())) == c  # one tuple, distinct rows
        assert y == int(t.grades[int(tuple_ids[0])])
        start += c
    with pytest.raises(ValueError, match="members"):
        draw_from_pool(pool)(torch.tensor([7]), torch.Generator())


def _pair_models(home: Path) -> tuple[ModelRegistry, PairNetwork, PairNetwork]:
    registry = ModelRegistry(home / "registry")
    dense, small = registry.load("pair-dense").model, registry.load("pair-s25").model
    assert isinstance(dense, PairNetwork) and isinstance(small, PairNetwork)
    return registry, dense, small


def _tiny_tuples(registry: ModelRegistry, count: int, n_max: int, seed: int, role: str = "train") -> object:
    extra = registry.manifest("pair-dense").extra["prototypes"]
    cfg = PrototypeConfig(**{**extra, "padding": tuple(extra["padding"])})
    if role != "train":
        cfg = replace(cfg, seed=cfg.seed + 2000, num_prototypes=200)
    return sample_pair_tuples(make_prototypes(cfg, role), count, n_max, PRIOR, seed=seed)


def test_outputs_of_several_variants_equal_each_alone_and_the_served_path(tiny_home: Path) -> None:
    registry, dense, small = _pair_models(tiny_home)
    tuples = _tiny_tuples(registry, 20, 3, seed=0)
    both = pair_tuple_outputs_many([dense, small], tuples)
    for model, out in zip([dense, small], both, strict=True):
        alone = pair_tuple_outputs(model, tuples)
        torch.testing.assert_close(out.logits, alone.logits)
        with torch.inference_mode():  # what the engine computes: the query folded, members scored against it
            logits, hidden = model.score(tuples.queries[:1], tuples.members[0])
        torch.testing.assert_close(out.logits[0], logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.hidden[0], hidden, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["lstm", "deepsets"])
def test_gadget_on_pair_hidden_states_trains_and_beats_chance(tiny_home: Path, kind: str) -> None:
    registry, dense, _ = _pair_models(tiny_home)
    train = pair_tuple_outputs(dense, _tiny_tuples(registry, 600, 8, seed=0))
    val = pair_tuple_outputs(dense, _tiny_tuples(registry, 200, 8, seed=1, role="val"))
    test = pair_tuple_outputs(dense, _tiny_tuples(registry, 600, 8, seed=2, role="val"))
    config = GadgetTrainConfig(n_max=8, steps=200, eval_every=50, val_tuples=200, seed=0)
    gadget = train_pair_gadget(kind, train, val, hidden_size=16, config=config)
    assert gadget_misfit(gadget, dense) is None
    untrained = build_gadget(gadget.spec).eval()
    members, counts = test.first(8)
    log_prior = log_prior_of(torch.tensor(PRIOR))
    acc = float((aggregate(kind, members, counts, log_prior, gadget).argmax(1) == test.grades).float().mean())
    acc0 = float((aggregate(kind, members, counts, log_prior, untrained).argmax(1) == test.grades).float().mean())
    chance = max(PRIOR)  # always answering the most frequent grade
    assert acc > chance + 0.1, (acc, chance)
    assert acc > acc0 + 0.05, (acc, acc0)


@pytest.fixture()
def gadget_home(tiny_home: Path, tmp_path: Path) -> Path:
    """A copy of the tiny home (the session's home stays untouched for the other tests)."""
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    return home


@pytest.mark.parametrize("kind", ["lstm", "deepsets"])
def test_the_gadget_command_stores_a_gadget_the_engine_serves(
    gadget_home: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["gadget", "--home", str(gadget_home), "--variant", "pair-s25", "--kind", kind]
    assert main([*argv, "--tuples", "300", "--val-tuples", "100", "--n-max", "6", "--steps", "60"]) == 0
    assert '"val_n_accuracy"' in capsys.readouterr().out
    registry = ModelRegistry(gadget_home / "registry")
    loaded = registry.load("pair-s25")
    assert loaded.gadget is not None and loaded.gadget.spec.kind == kind
    assert gadget_misfit(loaded.gadget, loaded.model) is None  # type: ignore[arg-type]
    snapshot = load_snapshot(
        registry, gadget_home / "spaces" / "default", CascadeConfig.load(gadget_home / CONFIG_FILE)
    )
    assert snapshot.queries is not None
    target = target_from_examples(snapshot, snapshot.queries.x[:1], candidates=30)
    stages = [
        Stage(variant="pair-s25", samples=3, keep=10, aggregator=kind),
        Stage(variant="pair-dense", samples=6, aggregator="bayes"),
    ]
    result = run_cascade(snapshot, target, k=5, stages=stages, seed=0)
    first = result.stages[0]
    assert first.aggregator == kind and first.clusters_in == 30 and first.kept == 10
    per_pair = snapshot.variants["pair-s25"].flops.nonzero
    query = snapshot.variants["pair-s25"].query_flops
    assert first.flops > first.items * per_pair + query  # the gadget's FLOPs are counted on top
    assert len(result.cluster_ids) == 5 and np.isfinite(result.scores).all()
    # the dense model has no gadget: asking for one there is a stage error naming the field
    from cascade.errors import RequestError

    with pytest.raises(RequestError) as exc:
        run_cascade(snapshot, target, k=5, stages=[Stage(variant="pair-dense", samples=2, aggregator=kind)])
    assert exc.value.field == "stages[0].aggregator"
    # a gadget of the other kind is a stage error too (it used to reach `aggregate` and fail there)
    other = "deepsets" if kind == "lstm" else "lstm"
    with pytest.raises(RequestError, match=f"has a '{kind}' gadget") as exc:
        run_cascade(snapshot, target, k=5, stages=[Stage(variant="pair-s25", samples=2, aggregator=other)])
    assert exc.value.field == "stages[0].aggregator"


def test_a_running_server_adopts_a_new_gadget_on_reload(gadget_home: Path) -> None:
    """`prunecascade gadget` writes beside a served variant; `POST /v1/admin/reload` adopts it (a new snapshot id,
    so no cached answer of the old one is served), and before that a stage asking for it is a 422."""
    import httpx
    from conftest import start_server, stop_server

    token = "gadget-admin-token-0123456789"
    auth = {"Authorization": f"Bearer {token}"}
    server = start_server(gadget_home, {"PRUNECASCADE_ADMIN_TOKEN": token})
    try:
        url = server.url
        (q,) = httpx.get(f"{url}/v1/space/queries", params={"limit": 1}).json()["queries"]
        stages = [
            {"variant": "pair-s25", "samples": 2, "keep": 10, "aggregator": "lstm"},
            {"variant": "pair-dense", "samples": 4},
        ]
        body = {"target": {"examples": [q["x"]]}, "k": 5, "stages": stages}
        before = httpx.post(f"{url}/v1/query", json=body)
        assert before.status_code == 422 and "pair-s25 has none" in before.text
        argv = ["gadget", "--home", str(gadget_home), "--variant", "pair-s25", "--kind", "lstm"]
        assert main([*argv, "--tuples", "200", "--val-tuples", "100", "--n-max", "4", "--steps", "20"]) == 0
        old_id = httpx.get(f"{url}/v1/space").json()["snapshot_id"]
        changed = httpx.post(f"{url}/v1/admin/reload", headers=auth).json()["changed"]
        assert changed == ["pair-s25:1 gadget"]
        after = httpx.post(f"{url}/v1/query", json=body)
        assert after.status_code == 200, after.text
        assert after.json()["stages"][0]["aggregator"] == "lstm"
        assert after.json()["snapshot_id"] != old_id
        assert httpx.post(f"{url}/v1/admin/reload", headers=auth).json()["changed"] == []  # nothing new now
    finally:
        stop_server(server)


def test_a_gadget_that_does_not_fit_the_variant_is_refused(gadget_home: Path) -> None:
    registry, _, small = _pair_models(gadget_home)
    width = small.spec.scorer.hidden[-1]
    wrong_grades = build_gadget(GadgetSpec("lstm", width, 10, 8))
    with pytest.raises(ValueError, match="grades"):
        store_pair_gadget(registry, "pair-s25", 1, wrong_grades)
    wrong_width = build_gadget(GadgetSpec("deepsets", width + 1, 3, 8))
    with pytest.raises(ValueError, match="hidden"):
        store_pair_gadget(registry, "pair-s25", 1, wrong_width)
    assert registry.load("pair-s25").gadget is None  # nothing was written
    fits = build_gadget(GadgetSpec("deepsets", width, 3, 8))
    store_pair_gadget(registry, "pair-s25", 1, fits)
    assert registry.load("pair-s25").gadget is not None


def test_the_gadget_command_refuses_a_classifier(gadget_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["gadget", "--home", str(gadget_home), "--variant", "dense", "--steps", "5"])
    assert code == 2 and "classifier" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kind"):
        train_gadget_for(ModelRegistry(gadget_home / "registry"), "pair-s25", kind="gru")


@pytest.mark.parametrize("aggregator", DEFAULT_AGGREGATORS)
def test_pair_experiment_measures_every_aggregator(tiny_home: Path, aggregator: str) -> None:
    registry, dense, small = _pair_models(tiny_home)
    variants = [pair_variant("dense", "dense", 1.0, dense), pair_variant("s25", "greedy-asymmetric", 0.25, small)]
    train = _tiny_tuples(registry, 200, 4, seed=0)
    val = _tiny_tuples(registry, 60, 4, seed=1, role="val")
    test = _tiny_tuples(registry, 300, 4, seed=2, role="val")
    budgets = [variants[1].flops * 2 + 10**6, variants[0].flops * 3 + 10**6]
    result = run_pair_experiment(
        variants,
        train,
        val,
        test,
        tuple_prior=PRIOR,
        model_prior=PRIOR,
        ns=[1, 2, 4],
        aggregators=[aggregator],
        budgets=budgets,
        gadget_config=GadgetTrainConfig(n_max=4, steps=30, eval_every=10, val_tuples=60),
    )
    assert len(result.rows) == 2 * 3
    for r in result.rows:
        assert 0 <= r.n_accuracy_low <= r.n_accuracy <= r.n_accuracy_high <= 1 and r.ri <= 1
        assert r.flops_tuple == r.n * r.flops_item + r.flops_aggregator and r.tuples == 300
        assert (r.flops_aggregator > 3 * r.n) == (aggregator in ("lstm", "deepsets"))
    # n = 1: every averaging rule is the single member's softmax, so they agree with the pair accuracy
    if aggregator in ("mean_prob", "mean_logit", "bayes"):
        for r in result.rows:
            if r.n == 1:
                assert r.n_accuracy == pytest.approx(r.accuracy)
    assert {s.budget for s in result.sweet_spots} == set(budgets)
    for s in result.sweet_spots:
        assert s.flops_tuple <= s.budget
