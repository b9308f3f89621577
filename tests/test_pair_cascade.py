"""The cascade of pair models (queries by example) on the tiny bootstrapped space: the scorer interface of both
kinds, graded ground truth, stage 0 from the embedding, the cascade, FAISS only, retrieve-and-rerank, the
oracle, and the HTTP path with its bad inputs."""

from __future__ import annotations

import dataclasses
import json
import types

import httpx
import numpy as np
import pytest
import torch

from cascade.config import Stage
from cascade.costs import dense_flops
from cascade.engine import dense_oracle
from cascade.errors import RequestError
from cascade.plan import plan_target, run_cascade, target_from_examples, target_from_label
from cascade.queries import cluster_grades
from cascade.snapshot import build_snapshot
from cascade.space import sample_members
from models.inference import score_chunked
from models.pair import folded_pair_cost, plain_pair_cost
from models.scorer import cluster_context, item_inputs


def _query(snapshot, i: int = 0) -> np.ndarray:
    assert snapshot.queries is not None and len(snapshot.queries) > i
    return snapshot.queries.x[i : i + 1]


@pytest.mark.parametrize("kind", ["classifier", "pair"])
def test_one_scorer_interface_for_both_kinds(snapshot, kind: str) -> None:
    variant = next(v for v in snapshot.variants.values() if v.kind == kind)
    items = snapshot.features[:300]
    q1, q2 = torch.from_numpy(_query(snapshot, 0)), torch.from_numpy(_query(snapshot, 1))
    with torch.inference_mode():
        a_logits, a_hidden = variant.model.score(q1, items)
        b_logits, _ = variant.model.score(q2, items)
        chunked_logits, chunked_hidden = score_chunked(variant.model, q1, items, chunk=64)
    outputs = snapshot.space.num_classes if kind == "classifier" else snapshot.num_grades
    assert a_logits.shape == (300, outputs) and a_hidden.shape[0] == 300
    torch.testing.assert_close(chunked_logits, a_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked_hidden, a_hidden, rtol=1e-4, atol=1e-5)
    if kind == "classifier":
        torch.testing.assert_close(a_logits, b_logits)  # a classifier ignores the query
    else:
        assert not torch.allclose(a_logits, b_logits)  # a pair model reads it
        with torch.inference_mode():  # served folded: the same function as reading q and x unfolded
            plain_logits, plain_hidden = variant.model.forward_with_hidden(q1, items)
        torch.testing.assert_close(a_logits, plain_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a_hidden, plain_hidden, rtol=1e-4, atol=1e-4)


def test_ground_truth_is_constant_on_every_cluster(snapshot) -> None:
    space, queries = snapshot.space, snapshot.queries
    member_cluster = np.repeat(np.arange(space.num_clusters), space.sizes)
    for i in range(len(queries)):
        per_cluster = cluster_grades(space.cluster_labels, int(queries.cluster[i]), int(queries.label[i]))
        per_item = np.where(member_cluster == queries.cluster[i], 2, (space.labels == queries.label[i]).astype(int))
        assert np.array_equal(per_item, per_cluster[member_cluster])  # the grade of a member is its cluster's
        assert (per_cluster == 2).sum() == 1
    assert not any(np.array_equal(q, x) for q in queries.x for x in space.features[:: max(1, space.num_items // 500)])


def test_stage0_proposes_from_the_embedding_and_faiss_only_is_a_cascade(snapshot) -> None:
    target = target_from_examples(snapshot, _query(snapshot), candidates=30)
    assert target.kind == "pair" and target.candidates is not None and len(target.candidates) == 30
    assert target.flops == snapshot.embedding.flops_per_query > 0
    assert np.all(np.diff(target.candidate_distances) >= -1e-6)  # nearest first
    result = run_cascade(snapshot, target, k=5, stages=[])
    np.testing.assert_array_equal(result.cluster_ids, target.candidates[:5])
    assert result.stages == [] and result.flops == 0 and result.ranking == "negative_sq_distance"
    np.testing.assert_allclose(result.scores, -target.candidate_distances[:5])


def test_pair_cascade_accounting_and_candidates(snapshot) -> None:
    target = target_from_examples(snapshot, _query(snapshot, 3), candidates=40)
    result = run_cascade(snapshot, target, k=5, seed=1)
    assert set(result.cluster_ids.tolist()) <= set(target.candidates.tolist())
    first = result.stages[0]
    assert first.clusters_in == 40 and first.kept == snapshot.config.pair_stages[0].keep
    variant = snapshot.variants[first.variant]
    assert variant.kind == "pair"
    assert variant.query_flops > 0  # the query's trunk and fold, once per query and stage
    # the scorer's own count for this many items (folded or plain, whichever is cheaper), then Bayes per member
    paths = [plain_pair_cost(variant.model), folded_pair_cost(variant.model)]
    dense = [q.dense_kernel + first.items * p.dense_kernel for p, q in paths]
    pick = int(variant.model.folds(first.items))
    assert dense[pick] == min(dense)  # the scorer picks the cheaper path (by dense kernels)
    pair, query = paths[pick]
    assert first.flops == query.nonzero + first.items * pair.nonzero + first.items * snapshot.num_grades
    assert result.posteriors.shape == (5, snapshot.num_grades)
    np.testing.assert_allclose(result.posteriors.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(result.scores, result.posteriors @ target.utility, rtol=1e-5)
    assert np.all(np.diff(result.ranking_values) <= 1e-9)
    assert plan_target(snapshot, target, 5).flops >= result.flops + target.flops


def test_several_examples_average_at_a_proportional_cost(snapshot) -> None:
    one = target_from_examples(snapshot, _query(snapshot, 2), candidates=20)
    two = target_from_examples(snapshot, np.repeat(_query(snapshot, 2), 2, axis=0), candidates=20)
    a, b = run_cascade(snapshot, one, 5, seed=3), run_cascade(snapshot, two, 5, seed=3)
    np.testing.assert_array_equal(a.cluster_ids, b.cluster_ids)  # the same example twice: the same posterior
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    assert b.flops == 2 * a.flops and two.flops == 2 * one.flops
    assert dense_flops(snapshot, two) == 2 * dense_flops(snapshot, one)


def test_oracle_scores_every_cluster_and_retrieve_and_rerank_is_one_dense_stage(snapshot) -> None:
    target = target_from_examples(snapshot, _query(snapshot, 5), candidates=25)
    oracle = dense_oracle(snapshot, target, k=5)
    dense = snapshot.dense_for("pair")
    assert oracle.stages[0].clusters_in == snapshot.space.num_clusters
    assert (
        oracle.flops
        == dense_flops(snapshot, target)
        == snapshot.space.num_items * dense.flops.nonzero + dense.query_flops
    )
    widest = int(snapshot.space.sizes.max())
    rerank = run_cascade(snapshot, target, 5, [Stage(variant=dense.name, samples=widest)])
    assert rerank.stages[0].items == int(snapshot.space.sizes[target.candidates].sum())
    # on the candidates both are the same computation: every oracle answer among them is ranked alike
    shared = [c for c in oracle.cluster_ids if c in set(target.candidates.tolist())]
    assert list(rerank.cluster_ids[: len(shared)]) == shared[: len(rerank.cluster_ids)] or not shared


def test_dense_pair_model_finds_the_own_cluster_more_often_than_chance(snapshot) -> None:
    queries = snapshot.queries
    hits = 0
    for i in range(len(queries)):
        target = target_from_examples(snapshot, queries.x[i : i + 1], candidates=snapshot.space.num_clusters)
        hits += int(dense_oracle(snapshot, target, 10).cluster_ids[0] == queries.cluster[i])
    assert hits / len(queries) > 10 / snapshot.space.num_clusters  # far above chance even for the tiny model


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda s: (target_from_label(s, 1), [Stage(variant="pair-s25", samples=2)]), "stages[0].variant"),
        (lambda s: (target_from_examples(s, _query(s), 20), [Stage(variant="dense", samples=2)]), "stages[0].variant"),
        (lambda s: (target_from_label(s, 1), []), "stages"),
    ],
)
def test_a_stage_of_the_wrong_kind_names_the_field(snapshot, make, field: str) -> None:
    target, stages = make(snapshot)
    with pytest.raises(RequestError) as info:
        run_cascade(snapshot, target, 5, stages)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("examples", "gains", "field"),
    [
        ([[0.0] * 39], None, "target.examples"),
        ([[float("nan")] * 40], None, "target.examples"),
        ([[0.0] * 40], [1.0, 2.0], "target.gains"),
        ([[0.0] * 40], [0.0, 0.0, 0.0], "target.gains"),
    ],
)
def test_bad_query_objects_name_the_field(snapshot, examples, gains, field: str) -> None:
    with pytest.raises(RequestError) as info:
        target_from_examples(snapshot, examples, 10, gains)
    assert info.value.field == field


def test_classifier_fallback_without_pair_models(snapshot) -> None:
    """An older home (no pair model, no embedding): the dense classifier turns the examples into a utility."""
    config = snapshot.config.model_copy(update={"pair_stages": None, "pair_dense": None})
    old = dataclasses.replace(snapshot, config=config, embedding=None)
    space = old.space
    rows = np.flatnonzero(space.labels == 4)[:3]
    target = target_from_examples(old, space.features[rows], candidates=60)
    assert target.kind == "classifier" and len(target.candidates) == 60
    result = run_cascade(old, target, k=5)
    assert set(result.cluster_ids.tolist()) <= set(target.candidates.tolist())


def _post(server, body: dict | str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{server.url}/v1/query", content=content, headers={"content-type": "application/json"})


def test_http_query_by_example_with_a_held_out_query(server) -> None:
    page = httpx.get(f"{server.url}/v1/space/queries", params={"offset": 1, "limit": 3}).json()
    assert page["total"] >= 3 and [q["index"] for q in page["queries"]] == [1, 2, 3]
    q = page["queries"][0]
    r = _post(server, {"target": {"examples": [q["x"]]}, "k": 5, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "cascade" and body["outputs"] == ["other", "same_label", "same_cluster"]
    assert body["ranking"] == "utility_log_odds" and len(body["clusters"]) == 5
    assert body["dense_flops"] > body["flops"] > 0 and body["target_flops"] > 0
    (cache,) = httpx.get(f"{server.url}/v1/space").json()["item_cache"]  # warmed before serving, one trunk
    assert cache["bytes"] > 0 and cache["build_flops"] > 0 and cache["key"].startswith("pair-trunk:")
    hit = body["clusters"][0]
    assert hit["score"] == pytest.approx(sum(g * p for g, p in zip([0, 1, 3], hit["posterior"], strict=True)))
    faiss = _post(server, {"target": {"examples": [q["x"]]}, "k": 5, "stages": []}).json()
    assert faiss["mode"] == "faiss" and faiss["flops"] == 0 and faiss["ranking"] == "negative_sq_distance"
    cluster = httpx.get(f"{server.url}/v1/clusters/{hit['cluster_id']}").json()
    assert cluster["size"] == len(cluster["members"]) > 0
    item = httpx.get(f"{server.url}/v1/items/{cluster['members'][0]}").json()
    assert item["cluster_id"] == hit["cluster_id"] and len(item["x"]) == len(q["x"])


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"target": {"examples": [[1.0], [1.0, 2.0]]}}, ["body", "target", "examples"]),
        ({"target": {"examples": [[1.0] * 39]}}, ["body", "target", "examples"]),
        ('{"target": {"examples": [[NaN, 1.0]]}}', ["body", "target", "examples"]),
        ({"target": {"examples": [[0.5] * 40] * 1025}}, ["body", "target", "examples"]),
        ({"target": {"examples": [[0.5] * 40] * 65}}, ["body", "target", "examples"]),
        ({"target": {"examples": [["a"] * 40]}}, ["body", "target", "examples"]),
        ({"target": {"label": 1}, "candidates": 5}, ["body", "candidates"]),
        ({"target": {"label": 1, "gains": [0, 1, 3]}}, ["body", "target", "gains"]),
        ({"target": {"examples": [[0.5] * 40]}, "mode": "exact"}, ["body", "mode"]),
        ({"target": {"label": 1}, "mode": "exact", "stages": [{"variant": "dense", "samples": 2}]}, ["body", "mode"]),
        ({"target": {"label": 1}, "stages": []}, ["body", "stages"]),
    ],
)
def test_http_bad_query_objects_get_a_422_naming_the_field(server, body, loc) -> None:
    r = _post(server, body)
    assert r.status_code == 422, r.text
    details = r.json()["detail"]
    assert len(details) <= 20
    assert any(d["loc"][: len(loc)] == loc for d in details), details


def test_http_missing_cluster_and_item_are_404(server) -> None:
    assert httpx.get(f"{server.url}/v1/clusters/999999").status_code == 404
    assert httpx.get(f"{server.url}/v1/items/-1").status_code == 404
    assert httpx.get(f"{server.url}/v1/space/queries", params={"limit": 100000}).status_code == 422


def test_cli_prints_held_out_queries_as_request_bodies(tiny_home, snapshot, capsys) -> None:
    from service.cli import main

    assert main(["queries", "--home", str(tiny_home), "--offset", "2", "--limit", "3", "--k", "7"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["truth"]["index"] for line in lines] == [2, 3, 4]
    for line in lines:
        i = line["truth"]["index"]
        assert line["truth"]["cluster_id"] == int(snapshot.queries.cluster[i]) and line["request"]["k"] == 7
        np.testing.assert_allclose(line["request"]["target"]["examples"][0], snapshot.queries.x[i], atol=1e-5)
    assert main(["queries", "--home", str(tiny_home), "--limit", "1", "--body"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"target", "k"}  # a /v1/query body, nothing else


def test_http_default_cascades_and_a_k_above_the_default_keep(server) -> None:
    cascade = httpx.get(f"{server.url}/v1/cascade").json()
    assert cascade["pair_dense"] == "pair-dense" and cascade["pair_stages"][-1]["variant"] == "pair-dense"
    keep = cascade["stages"][0]["keep"]
    body = {"target": {"label": 2}, "k": keep + 1, "mode": "cascade"}  # no stages sent: none may be blamed
    r = _post(server, body)
    assert r.status_code == 200, r.text
    assert len(r.json()["clusters"]) == keep + 1 and r.json()["stages"][0]["kept"] >= keep + 1


def test_item_inputs_are_cached_once_per_trunk_and_give_the_uncached_scores(snapshot) -> None:
    pairs = [v for v in snapshot.variants.values() if v.kind == "pair"]
    classifiers = [v for v in snapshot.variants.values() if v.kind == "classifier"]
    assert len(pairs) >= 2 and classifiers
    rows = torch.arange(0, snapshot.space.num_items, 7)
    q = torch.from_numpy(_query(snapshot, 4))
    for v in pairs:
        cached = snapshot.item_inputs(v, rows)
        with torch.inference_mode():
            got = score_chunked(v.model, q, cached, inputs=True)[0]
            # the plain forward on raw items, each with its cluster's centroid (a model with a retriever)
            context = cluster_context(v.model, snapshot.features, snapshot.space.offsets)
            want = v.model.forward_with_hidden(
                q, snapshot.features[rows], *(() if context is None else (context[rows],))
            )[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    entries = snapshot.item_cache.entries()
    assert len({v.inputs_key for v in pairs}) == 1 and len(entries) == 1  # pruned variants share the trunk
    assert entries[0].key.startswith(pairs[0].inputs_key)
    (entry,) = entries
    assert entry.table.shape == (snapshot.space.num_items, pairs[0].model.item_input_width)
    assert entry.nbytes == 4 * snapshot.space.num_items * pairs[0].model.item_input_width
    assert entry.build_flops == snapshot.space.num_items * pairs[0].model.item_input_flops().nonzero
    other = dataclasses.replace(snapshot, features=snapshot.features * 2.0)  # shares the cache object
    context = cluster_context(pairs[0].model, other.features, other.space.offsets)
    expected = item_inputs(pairs[0].model, other.features[rows], None if context is None else context[rows])
    torch.testing.assert_close(other.item_inputs(pairs[0], rows), expected, atol=1e-6, rtol=1e-6)
    for v in classifiers:  # a classifier reads the raw features: nothing cached
        assert v.inputs_key is None and snapshot.cached_inputs(v) is None
        torch.testing.assert_close(snapshot.item_inputs(v, rows), snapshot.features[rows])


@pytest.mark.parametrize("samples", [1, 3])
def test_stage_flops_equal_the_plan_where_every_cluster_has_enough_members(snapshot, samples: int) -> None:
    """A plan assumes every cluster has `samples` members; where they do, it is exact, and the stage's
    FLOPs are the scorer's count (plain or folded by the number of items) plus Bayes's accumulations."""
    target = target_from_examples(snapshot, _query(snapshot, 6), candidates=30)
    assert int(snapshot.space.sizes[target.candidates].min()) >= samples
    names = [v.name for v in snapshot.variants.values() if v.kind == "pair"]
    stages = [Stage(variant=names[0], samples=samples, keep=10), Stage(variant=names[-1], samples=samples)]
    result = run_cascade(snapshot, target, 5, stages, seed=2)
    assert plan_target(snapshot, target, 5, stages).flops == result.flops + target.flops
    for report in result.stages:
        variant = snapshot.variants[report.variant]
        assert report.items == report.clusters_in * samples
        assert report.flops == variant.cost(report.items).nonzero + report.items * snapshot.num_grades


def test_a_classifier_stage_costs_its_manifest_flops_per_item(snapshot) -> None:
    target = target_from_label(snapshot, snapshot.space.labels_known[1])
    result = run_cascade(snapshot, target, 5, seed=1)
    for report in result.stages:
        variant = snapshot.variants[report.variant]
        assert variant.kind == "classifier" and variant.query_flops == 0
        assert variant.cost(report.items).nonzero == report.items * variant.manifest.flops_nonzero


def _with_twin(snapshot, name: str, twin: str):
    """The snapshot with a second name for one variant (the same model): a stage of the twin is not the
    same variant as a stage of the original, so nothing is reused between them."""
    variants = dict(snapshot.variants)
    variants[twin] = variants[name]
    return dataclasses.replace(snapshot, variants=types.MappingProxyType(variants))


def test_a_stage_of_the_same_variant_extends_the_members_scored_before(snapshot) -> None:
    dense = snapshot.dense_for("pair").name
    twin_snapshot = _with_twin(snapshot, dense, "twin")
    target = target_from_examples(snapshot, _query(snapshot, 7), candidates=30)
    widest = int(snapshot.space.sizes.max())
    first, last = Stage(variant=dense, samples=2, keep=12), Stage(variant=dense, samples=widest)
    reused = run_cascade(twin_snapshot, target, 5, [first, last], seed=4)
    fresh = run_cascade(twin_snapshot, target, 5, [first, Stage(variant="twin", samples=widest)], seed=4)
    # the last stage takes every member either way: the same posteriors, but only the new members are scored
    np.testing.assert_array_equal(reused.cluster_ids, fresh.cluster_ids)
    np.testing.assert_allclose(reused.posteriors, fresh.posteriors, rtol=1e-5, atol=1e-6)
    assert reused.stages[1].items == fresh.stages[1].items - reused.stages[0].kept * 2
    variant = snapshot.variants[dense]
    prepared_for = reused.stages[0].items
    pairs = variant.cost(reused.stages[1].items, prepared_for=prepared_for)
    per_pair, _ = (folded_pair_cost if variant.model.folds(prepared_for) else plain_pair_cost)(variant.model)
    assert pairs == per_pair * reused.stages[1].items  # the pairs only: the query was prepared by stage 0
    assert reused.stages[1].flops == pairs.nonzero + fresh.stages[1].items * snapshot.num_grades
    assert plan_target(twin_snapshot, target, 5, [first, last]).flops == reused.flops + target.flops
    assert reused.flops < fresh.flops


def test_extending_members_samples_only_unscored_ones(snapshot) -> None:
    from cascade.stage_loop import _extend_many

    space = snapshot.space
    clusters = np.arange(0, space.num_clusters, 3)
    rng = np.random.default_rng(0)
    rows, counts = sample_members(space.offsets, clusters, 2, rng)
    new, need = _extend_many(space.offsets, [clusters], rows, counts, 5, [rng])
    sizes = space.sizes[clusters]
    np.testing.assert_array_equal(need, np.maximum(np.minimum(sizes, 5) - counts, 0))
    assert len(new) == need.sum() and not set(new.tolist()) & set(rows.tolist())
    owner = np.searchsorted(space.offsets, new, side="right") - 1
    np.testing.assert_array_equal(owner, np.repeat(clusters, need))  # grouped by cluster, in order
    none, zero = _extend_many(space.offsets, [clusters], rows, counts, 1, [rng])  # already enough
    assert len(none) == 0 and not zero.any()


def test_a_swap_keeps_the_item_cache_and_warm_builds_it_before_serving(snapshot) -> None:
    """`build_snapshot(..., item_cache=)` hands the tables to the next snapshot (a swap that keeps the trunk
    rebuilds nothing), `warm()` builds them before the first query, and tables no variant reads are dropped."""
    parts = (snapshot.space, snapshot.index)
    first = build_snapshot(*parts, snapshot.variants, snapshot.config, snapshot.embedding, snapshot.queries)
    assert first.item_cache.entries() == []  # nothing built until asked
    first.warm()
    (entry,) = first.item_cache.entries()
    second = build_snapshot(
        *parts, snapshot.variants, snapshot.config, snapshot.embedding, snapshot.queries, first.item_cache
    )
    second.warm()
    assert second.item_cache.entries()[0] is entry  # the same table, not rebuilt
    classifiers = {n: v for n, v in snapshot.variants.items() if v.kind == "classifier"}
    config = snapshot.config.model_copy(update={"pair_dense": None, "pair_stages": None})
    third = build_snapshot(*parts, classifiers, config, snapshot.embedding, snapshot.queries, first.item_cache)
    third.warm()
    assert third.item_cache.entries() == []  # no served variant reads it any more
