"""/metrics in Prometheus format with the series operators alert on, JSON logs carrying the request id."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import AUTH, QUERY, admin_server  # noqa: F401

from service.app import create_app
from service.logs import JsonFormatter
from service.settings import Settings


def _samples(url: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_metrics_cover_requests_stages_cache_versions_and_swaps(admin_server) -> None:
    url = admin_server.url
    body = {**QUERY, "seed": 4242}
    first = httpx.post(f"{url}/v1/query", json=body)
    second = httpx.post(f"{url}/v1/query", json=body)
    assert first.status_code == second.status_code == 200
    assert first.json()["cached"] is False and second.json()["cached"] is True
    assert second.headers["x-cache"] == "hit"
    assert {k: v for k, v in second.json().items() if k not in ("cached", "latency_ms")} == {
        k: v for k, v in first.json().items() if k not in ("cached", "latency_ms")
    }
    httpx.post(f"{url}/v1/query", json={"target": {"label": 99}})  # a 422

    m = _samples(url)
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in m["prunecascade_requests_total"]}
    assert requests[("/v1/query", "200")] >= 2 and requests[("/v1/query", "422")] >= 1
    assert any(s.labels["route"] == "/v1/query" for s in m["prunecascade_request_seconds_bucket"])
    stage_variants = {s.labels["variant"] for s in m["prunecascade_stage_seconds_count"]}
    assert {"cnn-s50", "dense"} <= stage_variants
    assert all(s.value > 0 for s in m["prunecascade_stage_flops_total"])
    assert sum(s.value for s in m["prunecascade_cache_hits_total"]) >= 1
    assert sum(s.value for s in m["prunecascade_cache_misses_total"]) >= 1
    active = {s.labels["name"]: int(s.labels["version"]) for s in m["prunecascade_active_version_info"]}
    assert active == httpx.get(f"{url}/v1/admin/state", headers=AUTH).json()["served"]
    snapshot_ids = [s.labels["snapshot_id"] for s in m["prunecascade_snapshot_info"]]
    assert snapshot_ids == [second.json()["snapshot_id"]]
    assert sum(s.value for s in m["prunecascade_swaps_total"]) >= 1  # the initial load counts as one
    assert "process_cpu_seconds_total" in m and "python_info" in m  # prometheus-client's default collectors
    assert not [name for name in m if name.endswith("_created")]


def test_request_id_is_echoed_or_assigned(admin_server) -> None:
    r = httpx.get(f"{admin_server.url}/healthz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.get(f"{admin_server.url}/healthz", headers={"x-request-id": "bad id\twith junk"})
    assert r.headers["x-request-id"] != "bad id\twith junk" and len(r.headers["x-request-id"]) == 32


@pytest.mark.anyio
async def test_access_log_lines_are_json_with_the_request_id(tmp_path) -> None:
    app = create_app(Settings(home=tmp_path, log_json=True))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("prunecascade.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.get("/metrics", headers={"x-request-id": "req-42"})  # probes log at debug
        assert r.status_code == 200
    finally:
        access.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines and lines[-1]["request_id"] == "req-42"
    assert lines[-1]["status"] == 200 and lines[-1]["level"] == "info" and "ms" in lines[-1]
