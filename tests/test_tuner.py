"""The tuner on the tiny home: targets are met on held-out test queries and a tighter target costs more; a
reranker worse than FAISS alone makes FAISS alone the default (and the space says why); re-tuning through the
admin route under load swaps the plan atomically, with no failed query.

The tiny home's own bi-encoder beats its tiny reranker, so where a test needs a reranker that helps, it serves a
copy of the home whose retriever is an untrained (random) bi-encoder: FAISS alone is then weak, and the dense
rerank of FAISS top M (M = every cluster of the tiny space) is not."""

from __future__ import annotations

import csv
import json
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import start_server, stop_server
from service_fixtures import AUTH, admin_env, copy_home

from cascade.config import CONFIG_FILE, CascadeConfig
from cascade.embedding import EmbeddingIndex
from cascade.plan import QualityUnmet, plan_for_quality
from cascade.queries import QuerySet, dev_rows
from cascade.snapshot import Snapshot, load_snapshot
from cascade.tuner import (
    BOOTSTRAP_RECORD,
    Measured,
    Plan,
    TuneOptions,
    measure_split,
    select,
    tune,
    tune_home,
)
from cascade.tuning_record import TuneTarget
from models.biencoder import BiEncoder
from models.pair import PairNetwork
from models.registry import ModelRegistry
from service.cli import main

FAST = TuneOptions(max_plans=24, max_seconds=120.0, progress=False)


def _snapshot(home: Path) -> Snapshot:
    return load_snapshot(
        ModelRegistry(home / "registry"), home / "spaces" / "default", CascadeConfig.load(home / CONFIG_FILE)
    )


@pytest.fixture(scope="module")
def weak_home(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny home with an untrained bi-encoder as stage 0 (its FAISS index rebuilt over that embedding)."""
    home = copy_home(tiny_home, tmp_path_factory.mktemp("weak") / "home")
    space_dir = home / "spaces" / "default"
    snapshot = _snapshot(home)
    assert snapshot.embedding is not None
    torch.manual_seed(1)
    encoder = BiEncoder(snapshot.embedding.encoder.spec).eval()  # type: ignore[arg-type]
    EmbeddingIndex.build(encoder, snapshot.space.features, snapshot.space.offsets).save(space_dir)
    return home


def test_split_rule_is_one_interleaved_partition(tiny_home: Path) -> None:
    qs = QuerySet.load(tiny_home / "spaces" / "default")
    assert qs is not None
    dev, test = qs.split("dev"), qs.split("test")
    assert len(dev) + len(test) == len(qs) and abs(len(dev) - len(test)) <= 1
    rows = dev_rows(len(qs))
    assert np.array_equal(dev.x, qs.x[rows]) and np.array_equal(test.x, qs.x[~rows])
    with pytest.raises(ValueError, match="split"):
        qs.split("train")


def test_target_met_on_test_queries_and_tighter_costs_more(weak_home: Path) -> None:
    snapshot = _snapshot(weak_home)
    chosen = {}
    for quality in (0.9, 0.99):
        result = tune(snapshot, replace(FAST, target=TuneTarget(kind="quality", value=quality), test=False))
        record = result.record
        assert record.reranker_helps, record.reason
        assert record.chosen.stages, record.reason  # a cascade, not FAISS alone
        assert record.chosen.rel_ndcg_low >= quality
        assert record.chosen.ndcg >= record.faiss_only.ndcg  # never loses to FAISS alone on dev queries
        assert all(p.flops <= record.oracle["flops"] for p in record.front)  # never above the dense on every item
        assert record.chosen.name in {p.name for p in record.front}
        # held-out test queries, measured afresh: the plan meets the target within its confidence
        test = measure_split(snapshot, [result.plan()], "test", FAST)
        _reference, plan = test
        assert len(plan.rel_ndcg) == len(snapshot.queries.split("test"))  # type: ignore[union-attr]
        n = len(plan.rel_ndcg)
        means = plan.rel_ndcg[np.random.default_rng(0).integers(0, n, size=(2000, n))].mean(axis=1)
        assert np.quantile(means, 0.975) >= quality, (quality, plan.mean_rel)
        chosen[quality] = record.chosen
    # a tighter target never buys a cheaper plan (on this tiny space the two may tie: both cheapest plans
    # already clear 0.99)
    assert chosen[0.99].flops >= chosen[0.9].flops, (chosen[0.9].name, chosen[0.99].name)
    assert chosen[0.99].rel_ndcg_low >= 0.99 > 0.9

    # a FLOPs budget: the best plan within it, never above it
    budget = chosen[0.99].flops * 0.999
    record = tune(snapshot, replace(FAST, target=TuneTarget(kind="flops", value=budget), test=False)).record
    assert 0 < record.chosen.flops <= budget
    # a request's quality picks the cheapest front plan that meets it
    assert plan_for_quality(record, 0.5).flops <= plan_for_quality(record, 0.99).flops
    with pytest.raises(QualityUnmet):
        plan_for_quality(None, 0.9)


def _random_reranker(home: Path) -> None:
    """Register pair-dense again with untrained weights (same architecture) and activate it."""
    registry = ModelRegistry(home / "registry")
    trained = registry.load("pair-dense")
    torch.manual_seed(3)
    model = PairNetwork(trained.model.spec)  # type: ignore[arg-type]
    registry.register(
        "pair-dense",
        model,
        accuracy=0.0,
        dataset="random",
        extra={"grade_prior": trained.manifest.extra["grade_prior"]},
    )


def test_bootstrap_check_switches_to_faiss_only_when_the_reranker_is_worse(
    tiny_home: Path, weak_home: Path, tmp_path: Path
) -> None:
    # the same check with a reranker that helps (weak retriever): a cascade stays the default
    helps = copy_home(weak_home, tmp_path / "helps")
    (helps / BOOTSTRAP_RECORD).write_text("{}")
    result = tune_home(helps)
    assert result is not None and result.record.reranker_helps
    assert CascadeConfig.load(helps / CONFIG_FILE).pair_stages

    home = copy_home(tiny_home, tmp_path / "random")
    (home / BOOTSTRAP_RECORD).write_text(json.dumps({"dataset": "mnist1d"}))
    _random_reranker(home)
    result = tune_home(home)
    assert result is not None
    config = CascadeConfig.load(home / CONFIG_FILE)
    assert config.pair_stages == () and config.pair_tuning is not None
    record = config.pair_tuning
    assert not record.reranker_helps and record.dense_rerank.ndcg <= record.faiss_only.ndcg
    assert "does not beat" in record.reason
    check = json.loads((home / BOOTSTRAP_RECORD).read_text())["dev_check"]
    assert check["reranker_helps"] is False and check["default_cascade"]["plan"] == "FAISS only"
    assert check["dev_queries"] == len(_snapshot(home).queries.split("dev"))  # type: ignore[union-attr]
    assert tune_home(home) is None  # tuned already: a second bootstrap does not measure again

    server = start_server(home)
    try:
        space = httpx.get(f"{server.url}/v1/space").json()
        assert space["reranker"]["reranker_helps"] is False and "does not beat" in space["reranker"]["why"]
        cascade = httpx.get(f"{server.url}/v1/cascade").json()
        assert cascade["pair_stages"] == [] and cascade["pair_tuning"]["chosen"]["name"] == "FAISS only"
        example = _snapshot(home).queries.x[0].tolist()  # type: ignore[union-attr]
        body = httpx.post(f"{server.url}/v1/query", json={"target": {"examples": [example]}, "k": 5}).json()
        assert body["mode"] == "faiss" and body["stages"] == []
    finally:
        stop_server(server)


def test_retune_under_load_swaps_atomically(weak_home: Path, tmp_path: Path) -> None:
    home = copy_home(weak_home, tmp_path / "home")
    shutil.rmtree(home / "data", ignore_errors=True)
    server = start_server(home, admin_env())
    url = server.url
    queries = _snapshot(home).queries
    assert queries is not None
    before = httpx.get(f"{url}/v1/cascade").json()
    assert before["pair_tuning"] is None
    answers: list[dict] = []
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def worker(w: int) -> None:
        with httpx.Client(timeout=60) as client:
            i = 0
            while not stop.is_set():
                body = {"target": {"examples": [queries.x[(w + 2 * i) % len(queries)].tolist()]}, "k": 5, "seed": i}
                try:
                    r = client.post(f"{url}/v1/query", json=body)
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    (answers.append(r.json()) if r.status_code == 200 else failures.append(f"{r.status_code} {r.text}"))
                i += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        r = httpx.post(f"{url}/v1/admin/tune", json={"quality": 0.95, "max_plans": 12}, headers=AUTH)
        assert r.status_code == 202, r.text
        assert httpx.post(f"{url}/v1/admin/tune", json={}, headers=AUTH).status_code == 409  # one at a time
        assert httpx.post(f"{url}/v1/admin/tune", json={}).status_code in (401, 403)
        deadline = time.monotonic() + 300
        while (job := httpx.get(f"{url}/v1/admin/tune", headers=AUTH).json())["state"] == "running":
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "applied", job
        time.sleep(1.0)  # queries land on the new snapshot too
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    try:
        assert not failures, failures[:3]
        after = httpx.get(f"{url}/v1/cascade").json()
        tuned = after["pair_tuning"]
        assert tuned is not None and tuned["chosen"]["name"] == job["chosen"]
        new_stages = [(s["variant"], s["samples"]) for s in after["pair_stages"]]
        assert new_stages != [(s["variant"], s["samples"]) for s in before["pair_stages"]]
        by_snapshot: dict[str, set] = {}
        for a in answers:
            by_snapshot.setdefault(a["snapshot_id"], set()).add(
                tuple((s["variant"], s["samples"]) for s in a["stages"])
            )
        assert job["snapshot_id"] in by_snapshot and len(by_snapshot) >= 2
        for sid, seen in by_snapshot.items():
            assert len(seen) == 1, (sid, seen)  # every snapshot answers with one plan: never a mix
        assert by_snapshot[job["snapshot_id"]] == {tuple(new_stages)}

        # a request may name a quality instead of stages: the cheapest front plan that meets it
        example = {"examples": [queries.x[1].tolist()]}
        r = httpx.post(f"{url}/v1/query", json={"target": example, "quality": 0.9})
        assert r.status_code == 200, r.text
        expected = plan_for_quality(CascadeConfig.model_validate(after).pair_tuning, 0.9)
        assert [(s["variant"], s["samples"]) for s in r.json()["stages"]] == [
            (s.variant, s.samples) for s in expected.stages
        ]
        r = httpx.post(f"{url}/v1/query", json={"target": example, "quality": 0.9, "stages": []})
        assert r.status_code == 422 and "quality" in r.text
        r = httpx.post(f"{url}/v1/query", json={"target": {"label": 1}, "quality": 0.9})
        assert r.status_code == 422 and "quality" in r.text

        # the load tester replays the front: one configuration per front plan, each with its own M and stages
        out = tmp_path / "loadtest"
        argv = ["loadtest", "--url", url, "--home", str(home), "--out", str(out), "--quiet", "--no-exact"]
        assert main([*argv, "--rates", "4", "--duration", "1", "--k", "5", "--front"]) == 0
        with (out / "results.csv").open() as f:
            rows = {row["config"]: row for row in csv.DictReader(f)}
        replayed = {name for name in rows if name.startswith("front ")}
        assert replayed == {f"front {p['name']}" for p in tuned["front"]}
        assert all(rows[name]["errors"] == "0" and int(rows[name]["ok"]) > 0 for name in replayed)
    finally:
        stop_server(server)


def test_tune_without_the_faiss_guard_stores_nothing_and_its_picture_says_so(weak_home: Path, tmp_path: Path) -> None:
    home = copy_home(weak_home, tmp_path / "home")
    before = (home / CONFIG_FILE).read_text()
    out = tmp_path / "out"
    argv = ["tune", "--home", str(home), "--out", str(out), "--max-plans", "12", "--no-test"]
    assert main([*argv, "--no-faiss-guard"]) == 0
    assert (home / CONFIG_FILE).read_text() == before  # nothing stored
    written = json.loads((out / "tuning.json").read_text())
    assert written["stored"] is False and written["plans"]
    assert (out / "front.png").stat().st_size > 0 and (out / "plans.csv").exists()
    assert main(argv) == 0  # with the guard: stored, and the picture's plan is the served one
    assert json.loads((out / "tuning.json").read_text())["stored"] is True
    assert CascadeConfig.load(home / CONFIG_FILE).pair_tuning is not None


def test_plan_names_and_keys_tell_plans_apart() -> None:
    from cascade.config import Stage

    a = Plan(100, (Stage(variant="s", samples=1, keep=20), Stage(variant="d", samples=6)))
    b = Plan(100, (Stage(variant="s", samples=1, keep=30), Stage(variant="d", samples=6)))
    assert a.key != b.key and a.name != b.name
    assert Plan(100, ()).key == Plan(50, ()).key  # FAISS alone does not depend on M


def _m(name: str, stages: int, rel: float, ndcg: float, flops: float, low: float | None = None) -> Measured:
    from cascade.config import Stage

    plan = Plan(100, tuple(Stage(variant=f"{name}{i}", samples=1, keep=50 - i) for i in range(stages)))
    ones = np.ones(4)
    return Measured(plan, rel * ones, ones, ones, ndcg * ones, flops * ones, flops / 1e6 * ones, low or rel)


def test_select_never_loses_to_faiss_and_takes_the_cheapest_that_meets() -> None:
    faiss = _m("f", 0, 0.90, 0.80, 1e6)
    ref = _m("r", 1, 1.00, 0.85, 1e9)
    cheap_bad = _m("a", 2, 0.995, 0.79, 1e7)  # meets the quality but loses to FAISS alone on the truth
    good = _m("b", 2, 0.992, 0.84, 2e7)
    better = _m("c", 2, 0.999, 0.85, 5e7)
    measured = [faiss, ref, cheap_bad, good, better]
    chosen, why, helps = select(measured, TuneTarget(kind="quality", value=0.99), faiss, ref, 1e10)
    assert helps and chosen is good, why
    chosen, _, _ = select(measured, TuneTarget(kind="quality", value=0.995), faiss, ref, 1e10)
    assert chosen is better
    chosen, _, _ = select(measured, TuneTarget(kind="quality", value=0.99), faiss, ref, 1e7)  # cap: dense cost
    assert chosen is faiss
    chosen, _, _ = select(measured, TuneTarget(kind="flops", value=3e7), faiss, ref, 1e10)
    assert chosen is good
    chosen, _, _ = select(measured, TuneTarget(kind="flops", value=1e5), faiss, ref, 1e10)
    assert chosen is faiss
    worse_ref = _m("r", 1, 1.0, 0.75, 1e9)
    chosen, why, helps = select([faiss, worse_ref, good], TuneTarget(kind="quality", value=0.5), faiss, worse_ref, 1e10)
    assert chosen is faiss and not helps and "does not beat" in why
