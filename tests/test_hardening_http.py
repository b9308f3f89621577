"""Hardening on real servers: the query deadline (504) and the bounded queue (503 + Retry-After), capped 422
bodies, request ids on every log line of a request, 500 tracebacks included, slow and
idle connections closed, slow bodies answered 408, a whitespace-padded admin token, one error body shape for
401/403/413/422 documented in OpenAPI, and the in-process fallback cache while Redis is down."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import Server, free_port, start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import QUERY, TOKEN, RedisProc, copy_home, redis_proc, wait_for  # noqa: F401

from service.app import create_app
from service.logs import JsonFormatter
from service.settings import Settings


def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _heavy(seed: int) -> dict:
    """A query that takes a while on the tiny space (dense on many members of every cluster)."""
    return {"target": {"label": 1}, "k": 5, "seed": seed, "stages": [{"variant": "dense", "samples": 8}]}


@pytest.fixture(scope="module")
def limited(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One slot, no queue, short header and body timeouts, and an admin token padded with whitespace."""
    home = copy_home(tiny_home, tmp_path_factory.mktemp("limited") / "home")
    env = {
        "PRUNECASCADE_MAX_CONCURRENT_QUERIES": "1",
        "PRUNECASCADE_MAX_QUEUED_QUERIES": "0",
        "PRUNECASCADE_RETRY_AFTER_S": "2",
        "PRUNECASCADE_HEADER_TIMEOUT_S": "0.5",
        "PRUNECASCADE_BODY_TIMEOUT_S": "0.5",
        "PRUNECASCADE_CACHE_ENABLED": "false",
        "PRUNECASCADE_ADMIN_TOKEN": f"  {TOKEN}\n",
    }
    s = start_server(home, env)
    yield s
    stop_server(s)


def test_a_full_queue_answers_503_with_retry_after(limited: Server) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=limited.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/query", json=_heavy(seed)) for seed in range(12)))

    before = _metric(limited.url, "prunecascade_query_rejected_total", reason="queue_full")
    statuses = [r.status_code for r in asyncio.run(burst())]
    responses = asyncio.run(burst())
    statuses += [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    refused = next(r for r in responses if r.status_code == 503) if 503 in [r.status_code for r in responses] else None
    if refused is not None:
        assert refused.headers["retry-after"] == "2"
        assert refused.json()["detail"][0]["type"] == "overloaded"
    rejected = _metric(limited.url, "prunecascade_query_rejected_total", reason="queue_full") - before
    assert rejected == statuses.count(503)
    assert _metric(limited.url, "prunecascade_query_inflight") == 0  # every slot was given back
    assert httpx.post(f"{limited.url}/v1/query", json=QUERY).status_code == 200


def test_the_query_deadline_answers_504(tiny_home: Path, tmp_path: Path) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    s = start_server(home, {"PRUNECASCADE_QUERY_TIMEOUT_S": "0.001", "PRUNECASCADE_CACHE_ENABLED": "false"})
    try:
        started = time.monotonic()
        r = httpx.post(f"{s.url}/v1/query", json=_heavy(1), timeout=60)
        assert r.status_code == 504, r.text
        assert r.json()["detail"][0]["type"] == "timeout" and "deadline" in r.json()["detail"][0]["msg"]
        assert time.monotonic() - started < 5
        assert _metric(s.url, "prunecascade_query_rejected_total", reason="deadline") >= 1
        assert httpx.get(f"{s.url}/v1/space").status_code == 200  # other routes have no query deadline
        # the abandoned computation gives its slot back when it ends
        assert wait_for(lambda: _metric(s.url, "prunecascade_query_inflight") == 0, timeout=30)
    finally:
        stop_server(s)


def test_a_huge_invalid_body_gets_a_small_422(limited: Server) -> None:
    """60,000 unknown keys (about 840 KB), each its own validation error: the 422 lists 20 and counts the rest
    (a body of 90,000 extra keys made an 8.1 MB answer before)."""
    body = json.dumps({"target": {"label": 1}, **{f"key{i:05d}": 0 for i in range(60_000)}}).encode()
    assert len(body) < 1_000_000
    r = httpx.post(f"{limited.url}/v1/query", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422, r.text[:500]
    detail = r.json()["detail"]
    assert len(detail) == 21 and detail[-1]["type"] == "too_many_errors"
    assert "59980 more" in detail[-1]["msg"]
    assert len(r.content) < 10_000


def test_idle_and_slow_header_connections_are_closed(limited: Server) -> None:
    port = int(limited.url.rsplit(":", 1)[1])
    idle = socket.create_connection(("127.0.0.1", port))
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
    for sock in (idle, slow):
        sock.settimeout(5)
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 4
        sock.close()
    with httpx.Client(base_url=limited.url) as client:  # a normal keep-alive client is unaffected
        assert client.get("/healthz").status_code == 200
        time.sleep(0.2)
        assert client.get("/healthz").status_code == 200


def test_a_slow_body_gets_408(limited: Server) -> None:
    port = int(limited.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(
            b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):  # head and body may come apart
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive" in answer


def test_admin_token_with_whitespace_is_stripped(limited: Server) -> None:
    r = httpx.get(f"{limited.url}/v1/admin/state", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    r = httpx.get(f"{limited.url}/v1/admin/state", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert r.json() == {"detail": [{"loc": [], "msg": "missing or wrong admin token", "type": "unauthorized"}]}
    assert r.headers["www-authenticate"] == "Bearer"


def test_error_statuses_share_one_body_and_are_documented(limited: Server) -> None:
    too_big = httpx.post(
        f"{limited.url}/v1/query", content=b"x" * 1_100_000, headers={"content-type": "application/json"}
    )
    assert too_big.status_code == 413
    unknown = httpx.get(f"{limited.url}/v1/nothing-here")
    for r in (too_big, unknown):
        detail = r.json()["detail"]
        assert isinstance(detail, list) and set(detail[0]) == {"loc", "msg", "type"}
    spec = httpx.get(f"{limited.url}/openapi.json").json()
    assert "ErrorBody" in spec["components"]["schemas"]
    for path, methods in spec["paths"].items():
        if not path.startswith("/v1/admin"):
            continue
        for method, op in methods.items():
            for code in ("401", "403", "503"):
                assert code in op["responses"], (method, path, code)
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith(("/ErrorBody", "/HTTPValidationError")), (method, path, code, ref)
    upload = spec["paths"]["/v1/admin/models"]["post"]["responses"]
    assert {"200", "201", "413", "415"} <= set(upload)
    assert "404" in spec["paths"]["/v1/admin/models/{name}/activate"]["post"]["responses"]


# -- request ids: in-process uvicorn so that the log records can be read ----------------------------------
class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def logged_app(tiny_home: Path) -> Iterator[tuple[str, _Lines]]:
    app = create_app(Settings(home=tiny_home, log_level="info", cache_enabled=False))
    test_log = logging.getLogger("test.requests")

    @app.get("/test/boom")
    def boom(tag: str) -> None:  # a sync route: runs in the thread pool
        test_log.warning("about to fail %s", tag)
        time.sleep(0.05)
        raise RuntimeError(f"boom {tag}")

    @app.get("/test/ok")
    def ok(tag: str) -> dict[str, str]:
        time.sleep(0.05)
        test_log.warning("fine %s", tag)
        return {"tag": tag}

    lines = _Lines()
    logging.getLogger().addHandler(lines)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout=30)
    try:
        yield f"http://127.0.0.1:{port}", lines
    finally:
        server.should_exit = True
        thread.join(10)
        logging.getLogger().removeHandler(lines)


def test_every_log_line_of_a_request_carries_its_id_500s_included(logged_app: tuple[str, _Lines]) -> None:
    url, lines = logged_app

    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            calls = []
            for i in range(6):
                route = "/test/boom" if i % 2 else "/test/ok"
                calls.append(client.get(route, params={"tag": f"tag-{i}-q"}, headers={"x-request-id": f"rid-{i}"}))
            return await asyncio.gather(*calls)

    responses = asyncio.run(many())
    for i, r in enumerate(responses):
        assert r.headers["x-request-id"] == f"rid-{i}"
        if i % 2:
            assert r.status_code == 500
            assert r.json()["detail"][0]["type"] == "internal_error"
        else:
            assert r.status_code == 200
    for i in range(6):
        server_lines = [line for line in lines.lines if line["logger"] != "httpx"]  # not the test's own client
        mine = [line for line in server_lines if f"tag-{i}-q" in line["msg"] or f"tag-{i}-q" in line.get("exc", "")]
        assert mine, i
        assert all(line["request_id"] == f"rid-{i}" for line in mine), mine
        if i % 2:
            tracebacks = [line for line in lines.lines if f"boom tag-{i}-q" in line.get("exc", "")]
            assert len(tracebacks) == 1 and tracebacks[0]["request_id"] == f"rid-{i}"
    assert not [line for line in lines.lines if "Exception in ASGI application" in line["msg"]]


def test_json_formatter_reads_the_id_of_the_current_context() -> None:
    from service.logs import request_id

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.ctx")
    log.addHandler(handler)
    try:
        token = request_id.set("abc")
        log.warning("inside")
        request_id.reset(token)
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["request_id"] == "abc" and outside["request_id"] == "-"


# -- Redis down: the in-process fallback keeps answering from cache ---------------------------------------------------
def test_the_fallback_cache_keeps_hits_while_redis_is_down(
    tiny_home: Path, tmp_path: Path, redis_proc: RedisProc
) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    s = start_server(home, {"PRUNECASCADE_REDIS_URL": redis_proc.url, "PRUNECASCADE_REDIS_RETRY_S": "0.2"})
    try:
        body = {**QUERY, "seed": 31337}
        first = httpx.post(f"{s.url}/v1/query", json=body)
        assert first.status_code == 200 and first.json()["cached"] is False
        assert httpx.post(f"{s.url}/v1/query", json=body).headers.get("x-cache") == "hit"
        redis_proc.kill()
        hits_before = _metric(s.url, "prunecascade_cache_hits_total", backend="fallback")
        for _ in range(3):
            r = httpx.post(f"{s.url}/v1/query", json=body)
            assert r.status_code == 200 and r.headers.get("x-cache") == "hit" and r.json()["cached"] is True
        assert _metric(s.url, "prunecascade_cache_hits_total", backend="fallback") == hits_before + 3
    finally:
        stop_server(s)


def test_connections_beyond_the_limit_get_503(tiny_home: Path, tmp_path: Path) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    s = start_server(home, {"PRUNECASCADE_MAX_CONNECTIONS": "3"})
    port = int(s.url.rsplit(":", 1)[1])
    try:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.3)
        assert httpx.get(f"{s.url}/healthz").status_code == 503
        for sock in held:
            sock.close()
        assert wait_for(lambda: httpx.get(f"{s.url}/healthz").status_code == 200, timeout=5)
    finally:
        stop_server(s)


def test_a_route_naming_its_field_keeps_its_error_items(limited: Server) -> None:
    r = httpx.get(f"{limited.url}/v1/clusters/999999999")
    assert r.status_code == 404
    assert r.json()["detail"][0]["loc"] == ["path", "cluster_id"] and r.json()["detail"][0]["type"] == "not_found"
