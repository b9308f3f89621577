"""Batching across queries: the stage loop over a batch (`cascade.stage_loop`) and the cross-request batcher
(`cascade.batcher`) give every query the answer it gets alone, bit for bit, on fixed seeds; deadlines hold in a
batch; the padded scoring calls equal the unpadded ones."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from cascade.batcher import Batcher
from cascade.config import Stage
from cascade.engine import CascadeResult, DeadlineExceeded
from cascade.plan import resolve_stages, target_from_examples, target_from_label
from cascade.space import sample_members
from cascade.stage_loop import StageJob, run_stages_many, sample_members_many
from models.inference import score_chunked, score_many


def _job(snapshot, i: int, seed: int, k: int = 5, stages=None, examples: int = 1, gains=None) -> StageJob:
    x = snapshot.queries.x[i : i + examples]
    target = target_from_examples(snapshot, x, 40, gains)
    return StageJob(target, k, resolve_stages(snapshot, target, k, stages), seed)


def _jobs(snapshot) -> list[StageJob]:
    """Default cascades, a cascade whose second stage extends the first, other aggregators, several examples,
    other gains and k, and a label target through the classifier cascade."""
    extend = [
        Stage(variant="pair-dense", samples=2, keep=12, aggregator="mean_logit"),
        Stage(variant="pair-dense", samples=5, aggregator="bayes"),
    ]
    mean_prob = [
        Stage(variant="pair-s25", samples=3, keep=10, aggregator="mean_prob"),
        Stage(variant="pair-dense", samples=4),
    ]
    jobs = [_job(snapshot, i, seed=100 + i) for i in range(10)]
    jobs += [_job(snapshot, i, seed=7 * i, stages=extend) for i in range(6)]
    jobs += [_job(snapshot, i, seed=i, stages=mean_prob, k=3) for i in range(4)]
    jobs += [_job(snapshot, 20, seed=3, examples=3), _job(snapshot, 25, seed=4, examples=2, stages=extend)]
    jobs += [_job(snapshot, 30, seed=5, gains=[0.0, 2.0, 1.0]), _job(snapshot, 31, seed=5, k=8)]
    label = target_from_label(snapshot, 1)
    jobs += [StageJob(label, 4, resolve_stages(snapshot, label, 4, None), seed=s) for s in range(3)]
    return jobs


def _same(a: CascadeResult, b: CascadeResult) -> bool:
    stages = [(s.variant, s.items, s.kept, s.clusters_in, s.flops, s.flops_dense_kernel) for s in a.stages]
    return (
        np.array_equal(a.cluster_ids, b.cluster_ids)
        and a.scores.tobytes() == b.scores.tobytes()
        and a.posteriors.tobytes() == b.posteriors.tobytes()
        and a.ranking_values.tobytes() == b.ranking_values.tobytes()
        and stages == [(s.variant, s.items, s.kept, s.clusters_in, s.flops, s.flops_dense_kernel) for s in b.stages]
    )


def test_a_batch_answers_every_query_as_it_is_answered_alone(snapshot) -> None:
    jobs = _jobs(snapshot)
    alone = [run_stages_many(snapshot, [job])[0] for job in jobs]
    together = run_stages_many(snapshot, jobs)
    shuffled_order = np.random.default_rng(0).permutation(len(jobs))
    shuffled = run_stages_many(snapshot, [jobs[i] for i in shuffled_order])
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert isinstance(a, CascadeResult) and isinstance(b, CascadeResult)
        assert _same(a, b), i
        assert _same(a, shuffled[int(np.flatnonzero(shuffled_order == i)[0])]), i  # type: ignore[arg-type]
    # the seeds matter: another seed samples other members (so equality above is not vacuous)
    other = run_stages_many(snapshot, [StageJob(jobs[10].target, jobs[10].k, jobs[10].stages, seed=999)])[0]
    assert not _same(alone[10], other)  # type: ignore[arg-type]


def test_sampling_many_queries_draws_what_each_draws_alone(snapshot) -> None:
    offsets = snapshot.space.offsets
    rng = np.random.default_rng(0)
    clusters = [rng.choice(snapshot.space.num_clusters, size, replace=False) for size in (30, 1, 17, 30)]
    for n in (1, 2, 5, 100):
        rows, counts = sample_members_many(offsets, clusters, n, [np.random.default_rng(s) for s in range(4)])
        alone = [sample_members(offsets, c, n, np.random.default_rng(s)) for s, c in enumerate(clusters)]
        assert np.array_equal(rows, np.concatenate([a[0] for a in alone]))
        assert np.array_equal(counts, np.concatenate([a[1] for a in alone]))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, 700])
def test_scoring_many_equals_scoring_each_alone(snapshot, rows: int) -> None:
    """Padded products (fewer than 4 rows) and the shared pass over several queries give what each query's own
    chunked pass gives."""
    variant = snapshot.variants["pair-dense"]
    model = variant.model
    queries = [torch.from_numpy(snapshot.queries.x[i : i + 1]) for i in range(3)]
    items = [snapshot.item_inputs(variant, torch.arange(j, j + rows + j)) for j in range(3)]
    with torch.inference_mode():
        prepared = [model.prepare(q, len(x)) for q, x in zip(queries, items, strict=True)]
        logits, hidden = score_many(model, prepared, items)
        one_by_one = [score_many(model, [p], [x]) for p, x in zip(prepared, items, strict=True)]
        reference = [score_chunked(model, q, x, inputs=True) for q, x in zip(queries, items, strict=True)]
    assert torch.equal(logits, torch.cat([o[0] for o in one_by_one]))
    assert torch.equal(hidden, torch.cat([o[1] for o in one_by_one]))
    for (a, _), (b, _) in zip(one_by_one, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_batch_shares_the_scorer_tail_and_the_retriever_residual(snapshot) -> None:
    """Today's pair models add their retriever's residual: the scorer after its first layer, its head and the
    residual's affine run once over the rows of every query of a batch, not once per query, and every query's
    rows are still the ones it gets alone."""
    variant = snapshot.variants["pair-dense"]
    model = variant.model
    assert model.retriever is not None and model.residual is not None
    queries = [torch.from_numpy(snapshot.queries.x[i : i + 1]) for i in range(5)]
    items = [snapshot.item_inputs(variant, torch.arange(3 * j, 3 * j + 2 + 3 * j)) for j in range(5)]
    calls = {"head": 0, "residual": 0}
    hooks = [
        model.scorer.head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1)),
        model.residual.register_forward_hook(lambda *_: calls.__setitem__("residual", calls["residual"] + 1)),
    ]
    try:
        with torch.inference_mode():
            prepared = [model.prepare(q, len(x)) for q, x in zip(queries, items, strict=True)]
            calls.update(head=0, residual=0)  # (preparing may count FLOPs with a forward pass)
            logits, hidden = score_many(model, prepared, items)
            assert calls == {"head": 1, "residual": 1}  # 40 rows of 5 queries on one path: one chunk
            one_by_one = [score_many(model, [p], [x]) for p, x in zip(prepared, items, strict=True)]
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(logits, torch.cat([o[0] for o in one_by_one]))
    assert torch.equal(hidden, torch.cat([o[1] for o in one_by_one]))


def test_the_batcher_batches_concurrent_queries_and_answers_each_as_alone(snapshot) -> None:
    jobs = [_job(snapshot, i, seed=50 + i) for i in range(8)]
    alone = [run_stages_many(snapshot, [job])[0] for job in jobs]
    batcher = Batcher(max_wait_s=5.0, max_batch=8)
    tokens = [batcher.expect() for _ in jobs]  # all eight announced: the first to arrive waits for the others
    batcher._running = 1  # as if another batch were being computed (waiting only then)
    results: list[CascadeResult | None] = [None] * len(jobs)

    def ask(i: int) -> None:
        results[i] = batcher.run(snapshot, jobs[i], tokens[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert batcher.stats.largest == 8 and batcher.stats.batches == 1  # one batch of all eight, closed when full
    batcher._running = 0
    # nobody on the way: a query starts at once, alone
    assert _same(batcher.run(snapshot, jobs[0]), alone[0]) and batcher.stats.batches == 2  # type: ignore[arg-type]
    for a, b in zip(alone, results, strict=True):
        assert b is not None and _same(a, b)  # type: ignore[arg-type]


def test_a_query_never_waits_for_a_batch_past_its_deadline(snapshot) -> None:
    batcher = Batcher(max_wait_s=60.0, max_batch=64)
    batcher.expect()  # a query on its way that never arrives: a new batch would wait up to a minute for it
    batcher._running = 1  # while another batch is computed
    job = _job(snapshot, 0, seed=1)
    late = StageJob(job.target, job.k, job.stages, job.seed, deadline=time.monotonic() + 0.3)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        batcher.run(snapshot, late)
    assert time.monotonic() - started < 30  # bounded by its deadline, not by the batch's wait
    # in a batch, a query past its deadline leaves it; the others get their answers, as alone
    past = StageJob(job.target, job.k, job.stages, job.seed, deadline=time.monotonic() - 1.0)
    on_time = _job(snapshot, 1, seed=2)
    results = run_stages_many(snapshot, [past, on_time])
    assert isinstance(results[0], DeadlineExceeded)
    assert _same(results[1], run_stages_many(snapshot, [on_time])[0])  # type: ignore[arg-type]


def test_a_follower_stops_waiting_at_its_deadline(snapshot) -> None:
    """A query whose batch is computed by another thread is answered DeadlineExceeded at its deadline, even
    if the batch is still running; the leader's answer is unaffected."""
    heavy = [Stage(variant="pair-dense", samples=8)]
    lead_job = _job(snapshot, 0, seed=1, stages=heavy)
    lead_job = StageJob(
        target_from_examples(snapshot, snapshot.queries.x[0:1], snapshot.space.num_clusters),
        5,
        lead_job.stages,
        1,
    )
    batcher = Batcher(max_wait_s=30.0, max_batch=2)
    batcher.expect()  # the leader waits for company until the follower fills the batch
    batcher._running = 1
    out: dict[str, object] = {}

    def lead() -> None:
        out["lead"] = batcher.run(snapshot, lead_job)

    t = threading.Thread(target=lead)
    t.start()
    time.sleep(0.2)  # the leader is waiting for company
    follower = StageJob(lead_job.target, 5, lead_job.stages, 2, deadline=time.monotonic() - 0.001)
    with pytest.raises(DeadlineExceeded):
        batcher.run(snapshot, follower)
    t.join(60)
    assert _same(out["lead"], run_stages_many(snapshot, [lead_job])[0])  # type: ignore[arg-type]


# -- over HTTP: the batched server, the multi-query route, the queue ------------------------------------------------
@pytest.fixture(scope="module")
def batching_server(tiny_home, tmp_path_factory):
    """Batching on with a wait long enough that concurrent queries do share batches, result cache off."""
    from conftest import start_server, stop_server
    from service_fixtures import copy_home

    home = copy_home(tiny_home, tmp_path_factory.mktemp("batching") / "home")
    env = {
        "PRUNECASCADE_CACHE_ENABLED": "false",
        "PRUNECASCADE_BATCH_MAX_WAIT_MS": "20",
        "PRUNECASCADE_MAX_CONCURRENT_QUERIES": "8",
    }
    s = start_server(home, env)
    yield s
    stop_server(s)


def _bodies(snapshot, count: int) -> list[dict]:
    extend = [{"variant": "pair-dense", "samples": 2, "keep": 12}, {"variant": "pair-dense", "samples": 5}]
    out = []
    for i in range(count):
        body = {"target": {"examples": snapshot.queries.x[i : i + 1].tolist()}, "k": 5, "seed": 11 + i}
        if i % 3 == 1:
            body["stages"] = extend
        out.append(body)
    return out


def _ranking(answer: dict) -> list:
    return [(c["cluster_id"], c["score"], c["ranking_value"], c["posterior"]) for c in answer["clusters"]]


def test_concurrent_http_queries_are_answered_as_alone(batching_server, snapshot) -> None:
    import asyncio

    import httpx

    bodies = _bodies(snapshot, 12)
    with httpx.Client(base_url=batching_server.url, timeout=60) as client:
        alone = [client.post("/v1/query", json=b).json() for b in bodies]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=batching_server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/query", json=b) for b in bodies))

    for _ in range(2):
        together = asyncio.run(burst())
        assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
        for a, b in zip(alone, together, strict=True):
            assert _ranking(a) == _ranking(b.json())
            assert [s["flops"] for s in a["stages"]] == [s["flops"] for s in b.json()["stages"]]


def test_the_multi_query_route_answers_each_query_as_alone(batching_server, snapshot) -> None:
    import httpx

    bodies = [
        *_bodies(snapshot, 6),
        {"target": {"examples": snapshot.queries.x[7:8].tolist()}, "k": 5, "stages": []},  # FAISS only
        {"target": {"label": 1}, "k": 4, "mode": "cascade", "seed": 3},  # the classifier cascade
    ]
    with httpx.Client(base_url=batching_server.url, timeout=60) as client:
        alone = [client.post("/v1/query", json=b).json() for b in bodies]
        r = client.post("/v1/query/batch", json={"queries": bodies})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert [_ranking(a) for a in alone] == [_ranking(b) for b in answer["results"]]
        assert [a["mode"] for a in alone] == [b["mode"] for b in answer["results"]]
        assert answer["flops"] == sum(a["flops"] for a in alone)
        # a bad query is named by its position
        bad = client.post("/v1/query/batch", json={"queries": [bodies[0], {**bodies[1], "k": 0}]})
        assert bad.status_code == 422 and "queries" in json.dumps(bad.json()["detail"])
        unknown = {"target": {"label": 99}, "k": 3}
        bad = client.post("/v1/query/batch", json={"queries": [bodies[0], unknown]})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["body", "queries", 1, "target", "label"]


def test_the_cost_budget_applies_to_the_whole_multi_query_request(tiny_home, tmp_path, snapshot) -> None:
    """A budget that each query fits but their sum does not: each alone is answered, together they are a 422."""
    import httpx
    from conftest import start_server, stop_server
    from service_fixtures import copy_home

    from cascade.plan import Query, plan_query

    bodies = _bodies(snapshot, 3)
    costs = [
        plan_query(
            snapshot,
            Query(
                examples=b["target"]["examples"],
                k=5,
                stages=[Stage(**x) for x in b["stages"]] if "stages" in b else None,
            ),
        ).flops
        for b in bodies
    ]
    home = copy_home(tiny_home, tmp_path / "home")
    s = start_server(home, {"PRUNECASCADE_MAX_QUERY_FLOPS": str(max(costs) + 1)})
    try:
        with httpx.Client(base_url=s.url, timeout=60) as client:
            assert all(client.post("/v1/query", json=b).status_code == 200 for b in bodies)
            r = client.post("/v1/query/batch", json={"queries": bodies})
            assert r.status_code == 422, r.text
            assert "together" in r.json()["detail"][0]["msg"]
            assert client.post("/v1/query/batch", json={"queries": bodies[:1]}).status_code == 200
    finally:
        stop_server(s)


def test_the_queue_still_answers_503_when_full_with_batching(tiny_home, tmp_path, snapshot) -> None:
    import asyncio

    import httpx
    from conftest import start_server, stop_server
    from service_fixtures import copy_home

    home = copy_home(tiny_home, tmp_path / "home")
    env = {
        "PRUNECASCADE_MAX_CONCURRENT_QUERIES": "1",
        "PRUNECASCADE_MAX_QUEUED_QUERIES": "0",
        "PRUNECASCADE_CACHE_ENABLED": "false",
        "PRUNECASCADE_BATCH_MAX_WAIT_MS": "5",
    }
    s = start_server(home, env)
    heavy = [{"variant": "pair-dense", "samples": 6}]
    bodies = [
        {
            "target": {"examples": snapshot.queries.x[i : i + 1].tolist()},
            "k": 5,
            "seed": i,
            "stages": heavy,
            "candidates": snapshot.space.num_clusters,
        }
        for i in range(12)
    ]
    try:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/query", json=b) for b in bodies))

        statuses = [r.status_code for r in asyncio.run(burst())] + [r.status_code for r in asyncio.run(burst())]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= 1 and statuses.count(200) >= 2, statuses
        assert httpx.post(f"{s.url}/v1/query", json=bodies[0], timeout=60).status_code == 200
    finally:
        stop_server(s)


def test_worker_processes_share_one_memory_mapped_item_cache(tiny_home, tmp_path, snapshot) -> None:
    """`prunecascade serve --workers 2`: both workers answer (as one worker does) and read the item inputs from
    one file beside the space, mapped read-only, which exists once."""
    import httpx
    from service_fixtures import copy_home, serve_with_workers

    from cascade.snapshot import ITEM_INPUTS_DIR

    home = copy_home(tiny_home, tmp_path / "home")
    body = {"target": {"examples": snapshot.queries.x[0:1].tolist()}, "k": 5, "seed": 4}
    with serve_with_workers(home, 2) as (_, url):
        answers, mapped = [], set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(answers) < 20:
            try:
                r = httpx.post(f"{url}/v1/query", json=body, timeout=30)
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            if r.status_code != 200:  # a worker still loading
                time.sleep(0.5)
                continue
            answers.append(_ranking(r.json()))
            space = httpx.get(f"{url}/v1/space", timeout=30)  # maybe the other worker, 503 while it still loads
            if space.status_code == 200:
                mapped |= {(e["mapped"], e["dtype"]) for e in space.json()["item_cache"]}
        assert len(answers) == 20 and all(a == answers[0] for a in answers)
        assert mapped == {(True, "float32")}
        files = list((home / "spaces" / "default" / ITEM_INPUTS_DIR).glob("*.npy"))
        assert len(files) == 1


def test_a_query_that_runs_no_stages_releases_its_announcement_at_once(snapshot) -> None:
    """A query by example that FAISS (or the exact table, or the cluster reader) answers was announced to the
    batcher before it was planned; `execute` releases it before answering, so a batch being formed stops waiting
    for it then, not when its response is sent."""
    from cascade.plan import Query, execute, plan_query

    batcher = Batcher(max_wait_s=5.0, max_batch=8)
    token = batcher.expect()
    plan = plan_query(snapshot, Query(examples=snapshot.queries.x[0:1], stages=[]))
    assert plan.path == "faiss" and token.pending
    execute(plan, 0, None, batcher, token)
    assert not token.pending and batcher._on_way == 0
