"""What the per-request fast path must keep: `/v1/query` serialises its answer itself (no second validation by
FastAPI) yet sends exactly the `QueryResponse` contract; the hot-path dependencies run on the event loop and
still answer 503 until a snapshot is loaded; the metrics middleware's cached label children count every request
under its own route, method and status. In process, through httpx's ASGI transport (no timing here)."""

from __future__ import annotations

import inspect
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import dependencies
from service.app import create_app
from service.schemas import QueryResponse
from service.settings import Settings

QUERY = {"target": {"label": 3}, "k": 5, "seed": 7, "mode": "cascade"}  # the models answer, not the exact table


def _app(home: Path, *, cache: bool, load: bool = True):
    app = create_app(Settings(home=home, cache_enabled=cache, log_level="warning"))
    if load:
        app.state.service.load()
    return app


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _counts(text: str) -> dict[tuple[str, str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "prunecascade_requests_total":
                out[(s.labels["route"], s.labels["method"], s.labels["status"])] = s.value
    return out


def test_hot_path_dependencies_do_not_use_the_thread_pool() -> None:
    """FastAPI runs a plain `def` dependency in its thread pool; these two must stay coroutines."""
    assert inspect.iscoroutinefunction(dependencies.get_state)
    assert inspect.iscoroutinefunction(dependencies.current_snapshot)


@pytest.mark.anyio
async def test_query_answer_is_exactly_the_response_model(tiny_home: Path) -> None:
    app = _app(tiny_home, cache=False)
    async with _client(app) as client:
        r = await client.post("/v1/query", json=QUERY)
        again = await client.post("/v1/query", json=QUERY)
        spec = (await client.get("/openapi.json")).json()
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert "x-cache" not in r.headers and "x-cache" not in again.headers  # cache off: computed both times
    body = r.json()
    assert list(body) == list(QueryResponse.model_fields)  # every field, in the model's order
    model = QueryResponse.model_validate_json(r.content)
    assert model.model_dump(mode="json") == body  # what FastAPI's response_model path would have sent
    assert body["cached"] is False and len(body["clusters"]) == QUERY["k"]
    assert body["snapshot_id"] == app.state.service.snapshot.id

    def timeless(b: dict) -> dict:
        stages = [{k: v for k, v in s.items() if k != "ms"} for s in b["stages"]]
        return {**{k: v for k, v in b.items() if k != "latency_ms"}, "stages": stages}

    assert timeless(again.json()) == timeless(body)  # same seed, same answer
    ok = spec["paths"]["/v1/query"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/QueryResponse"}  # still documented


@pytest.mark.anyio
async def test_cached_answer_is_the_same_answer_marked_cached(tiny_home: Path) -> None:
    app = _app(tiny_home, cache=True)
    async with _client(app) as client:
        first = await client.post("/v1/query", json=QUERY)
        second = await client.post("/v1/query", json={"mode": "cascade", "seed": 7, "k": 5, "target": {"label": 3}})
    assert first.status_code == second.status_code == 200
    assert "x-cache" not in first.headers and second.headers["x-cache"] == "hit"
    a, b = first.json(), second.json()
    assert a["cached"] is False and b["cached"] is True
    own = ("cached", "latency_ms")
    assert {k: v for k, v in a.items() if k not in own} == {k: v for k, v in b.items() if k not in own}
    assert b["latency_ms"] != a["latency_ms"]  # the hit reports its own time, not the original's
    QueryResponse.model_validate_json(second.content)


@pytest.mark.anyio
async def test_not_loaded_yet_answers_503_and_bad_input_still_names_the_field(tiny_home: Path) -> None:
    app = _app(tiny_home, cache=False, load=False)
    async with _client(app) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        r = await client.post("/v1/query", json=QUERY)
        assert r.status_code == 503 and "loading" in r.json()["detail"][0]["msg"]
        app.state.service.load()
        assert (await client.get("/readyz")).json()["ready"] is True
        bad = await client.post("/v1/query", json={"target": {"label": 3}, "k": 0})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "k"]
        too_big = await client.post("/v1/query", json={"target": {"label": 3}, "k": 10**6})
        assert too_big.status_code == 422 and too_big.json()["detail"][0]["loc"] == ["body", "k"]


@pytest.mark.anyio
async def test_metrics_count_every_request_by_route_method_and_status(tiny_home: Path) -> None:
    app = _app(tiny_home, cache=False)
    async with _client(app) as client:
        for _ in range(3):
            assert (await client.post("/v1/query", json=QUERY)).status_code == 200
        for _ in range(2):
            assert (await client.post("/v1/query", json={"target": {"label": 3}, "k": 0})).status_code == 422
        assert (await client.get("/no/such/path")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200
        counts = _counts((await client.get("/metrics")).text)
    assert counts[("/v1/query", "POST", "200")] == 3
    assert counts[("/v1/query", "POST", "422")] == 2
    assert counts[("unmatched", "GET", "404")] == 1
    assert counts[("/healthz", "GET", "200")] == 1
