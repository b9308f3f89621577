"""Requests refused before the router runs are still counted under their route, on real servers: the body-size
limit's 413 and the query limiter's 503 (queue full) and 504 (deadline passed while queued) on `/v1/query`, and
a checkpoint upload refused anywhere (body too large, declared or chunked; no token; an unparseable form; the
upload's own checks) is counted once in `prunecascade_uploads_total{outcome="refused"}`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import AUTH, TOKEN, copy_home

UPLOAD_LIMIT = 200_000


def _requests(url: str) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == "prunecascade_requests_total":
                out[(s.labels["route"], s.labels["method"], s.labels["status"])] = s.value
    return out


def _refused_uploads(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == "prunecascade_uploads_total" and s.labels["outcome"] == "refused":
                return s.value
    return 0.0


def _delta(before: dict, after: dict) -> dict[tuple[str, str, str], float]:
    """What changed between two readings, leaving out the readings themselves (GET /metrics)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0) and k[0] != "/metrics"}


def _heavy(seed: int) -> dict:
    """A query that takes a while on the tiny space (dense on many members of every cluster)."""
    return {"target": {"label": 1}, "k": 5, "seed": seed, "stages": [{"variant": "dense", "samples": 8}]}


def _burst(url: str, n: int) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/query", json=_heavy(seed)) for seed in range(n)))

    return asyncio.run(run())


def _start(tiny_home: Path, tmp: Path, env: dict[str, str]) -> Server:
    return start_server(copy_home(tiny_home, tmp / "home"), {"PRUNECASCADE_CACHE_ENABLED": "false", **env})


@pytest.fixture(scope="module")
def no_queue(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One slot and no queue (a second concurrent query is a 503), small body and upload limits, a token."""
    env = {
        "PRUNECASCADE_MAX_CONCURRENT_QUERIES": "1",
        "PRUNECASCADE_MAX_QUEUED_QUERIES": "0",
        "PRUNECASCADE_MAX_BODY_BYTES": "2048",
        "PRUNECASCADE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "PRUNECASCADE_ADMIN_TOKEN": TOKEN,
    }
    s = _start(tiny_home, tmp_path_factory.mktemp("no-queue"), env)
    yield s
    stop_server(s)


def test_a_too_large_query_body_is_counted_under_its_route(no_queue: Server) -> None:
    before = _requests(no_queue.url)
    body = b'{"target": {"label": 1}, "k": 5, "pad": "' + b"x" * 4096 + b'"}'
    r = httpx.post(f"{no_queue.url}/v1/query", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert _delta(before, _requests(no_queue.url)) == {("/v1/query", "POST", "413"): 1.0}


def test_a_full_queue_503_is_counted_under_its_route(no_queue: Server) -> None:
    before = _requests(no_queue.url)
    statuses: list[int] = []
    for _ in range(3):  # a burst on one slot without a queue refuses some at once; repeat if it happened not to
        statuses += [r.status_code for r in _burst(no_queue.url, 12)]
        if 503 in statuses:
            break
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    delta = _delta(before, _requests(no_queue.url))
    assert delta == {("/v1/query", "POST", str(code)): float(statuses.count(code)) for code in set(statuses)}


def test_the_query_deadline_while_queued_is_counted_under_its_route(tiny_home: Path, tmp_path: Path) -> None:
    env = {"PRUNECASCADE_MAX_CONCURRENT_QUERIES": "1", "PRUNECASCADE_QUERY_TIMEOUT_S": "0.001"}
    s = _start(tiny_home, tmp_path, env)
    try:
        before = _requests(s.url)
        responses: list[httpx.Response] = []
        for _ in range(3):  # every query passes its 1 ms deadline; those behind the slot's holder while queued
            responses += _burst(s.url, 8)
            if any("while queued" in r.text for r in responses):
                break
        assert {r.status_code for r in responses} == {504}
        assert any("while queued" in r.text for r in responses), [r.text for r in responses]
        assert _delta(before, _requests(s.url)) == {("/v1/query", "POST", "504"): float(len(responses))}
    finally:
        stop_server(s)


def _multipart(weights: bytes) -> dict:
    return {"manifest": ("manifest.json", b"{}"), "weights": ("weights.safetensors", weights)}


def test_an_upload_refused_by_the_body_limit_is_counted(no_queue: Server) -> None:
    url = f"{no_queue.url}/v1/admin/models"
    before, refused = _requests(no_queue.url), _refused_uploads(no_queue.url)
    declared = httpx.post(url, files=_multipart(b"\0" * (UPLOAD_LIMIT + 1)), headers=AUTH, timeout=60)
    assert declared.status_code == 413, declared.text
    assert _refused_uploads(no_queue.url) == refused + 1

    boundary = "b0undary"
    part = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="weights"; filename="w"\r\n\r\n'.encode()
        + b"\0" * (UPLOAD_LIMIT + 1)
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while the body streams in
        for i in range(0, len(part), 65_536):
            yield part[i : i + 65_536]

    headers = {**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"}
    chunked = httpx.post(url, content=chunks(), headers=headers, timeout=60)
    assert chunked.status_code == 413, chunked.text
    assert _refused_uploads(no_queue.url) == refused + 2
    assert _delta(before, _requests(no_queue.url)) == {("/v1/admin/models", "POST", "413"): 2.0}


def test_every_other_refused_upload_is_counted_once(no_queue: Server) -> None:
    url = f"{no_queue.url}/v1/admin/models"
    refused = _refused_uploads(no_queue.url)
    no_token = httpx.post(url, files=_multipart(b"x"), timeout=60)
    assert no_token.status_code == 401, no_token.text
    assert _refused_uploads(no_queue.url) == refused + 1
    no_weights = httpx.post(url, files={"manifest": ("manifest.json", b"{}")}, headers=AUTH, timeout=60)
    assert no_weights.status_code == 422, no_weights.text
    assert _refused_uploads(no_queue.url) == refused + 2
    bad_manifest = httpx.post(url, files=_multipart(b"x"), headers=AUTH, timeout=60)  # refused by the route itself
    assert bad_manifest.status_code == 422 and "manifest" in bad_manifest.text, bad_manifest.text
    assert _refused_uploads(no_queue.url) == refused + 3
