"""A client that sends the head of a query and then its body one byte at a time costs nothing to hold open, so it
must not hold query capacity: with more slow bodies open than slots and queue places together, a normal client's
queries are all answered (real uvicorn on loopback, raw sockets for the slow clients)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, start_server, stop_server
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import QUERY, copy_home, wait_for

SLOTS = 4
QUEUE = 32
SLOW_CLIENTS = SLOTS + QUEUE  # enough to fill every slot and queue place of a limiter that admits before the body


def _gauges(url: str, *names: str) -> float:
    """Sum of the named series (0 for a series this server does not export)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in names)


@pytest.fixture
def attacked(tiny_home: Path, tmp_path: Path) -> Iterator[tuple[Server, list[socket.socket]]]:
    home = copy_home(tiny_home, tmp_path / "home")
    server = start_server(
        home,
        {
            "PRUNECASCADE_MAX_CONCURRENT_QUERIES": str(SLOTS),
            "PRUNECASCADE_MAX_QUEUED_QUERIES": str(QUEUE),
            "PRUNECASCADE_BODY_TIMEOUT_S": "60",  # longer than the test: the slow bodies stay open throughout
        },
    )
    port = int(server.url.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    try:
        for _ in range(SLOW_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            held.append(sock)
        yield server, held
    finally:
        for sock in held:
            sock.close()
        stop_server(server)


def test_slow_bodies_hold_no_query_capacity(attacked: tuple[Server, list[socket.socket]]) -> None:
    server, held = attacked
    # every slow request has reached the server: admitted (old behaviour) or waiting for its body
    reached = ("prunecascade_query_inflight", "prunecascade_query_queued", "prunecascade_request_bodies_pending")
    seen = wait_for(lambda: _gauges(server.url, *reached) >= SLOW_CLIENTS, timeout=20)
    assert seen, "the slow requests never reached the server"
    label = {"target": {"label": 2}, "k": 5}  # answered from the exact table (and cached after the first)
    example = httpx.get(f"{server.url}/v1/space/queries", params={"limit": 1}, timeout=10).json()["queries"][0]
    statuses = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for seed in range(4):
            statuses.append(client.post("/v1/query", json={**QUERY, "seed": seed}).status_code)
            statuses.append(client.post("/v1/query", json=label).status_code)
        statuses.append(client.post("/v1/query", json={"target": {"examples": [example["x"]]}, "k": 5}).status_code)
    assert statuses and all(s == 200 for s in statuses), statuses
    assert _gauges(server.url, "prunecascade_query_inflight") == 0  # the slow requests hold no slot
    for sock in held:  # still open: the server did not merely drop them
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)


def test_a_slow_body_is_answered_408_without_having_taken_a_slot(tiny_home: Path, tmp_path: Path) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    server = start_server(home, {"PRUNECASCADE_BODY_TIMEOUT_S": "0.5", "PRUNECASCADE_MAX_CONCURRENT_QUERIES": "1"})
    port = int(server.url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            sock.sendall(b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            answer = b""
            while not answer.endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"did not arrive" in answer
        assert _gauges(server.url, "prunecascade_query_queue_seconds_count") == 0  # it never waited for a slot
        assert httpx.post(f"{server.url}/v1/query", json=QUERY, timeout=30).status_code == 200
    finally:
        stop_server(server)


def test_heavy_queries_leave_a_slot_for_a_cheap_one(tiny_home: Path, tmp_path: Path) -> None:
    """Two slots, one of them reserved: twelve worst-case queries sent at once run one at a time, and a cheap
    query sent after them is answered before most of them (in one FIFO queue it would wait behind ten)."""
    import asyncio

    home = copy_home(tiny_home, tmp_path / "home")
    server = start_server(
        home,
        {
            "PRUNECASCADE_MAX_CONCURRENT_QUERIES": "2",
            "PRUNECASCADE_RESERVED_SLOTS": "1",
            "PRUNECASCADE_HEAVY_QUERY_FLOPS": "1000000",
            "PRUNECASCADE_CACHE_ENABLED": "false",
            "PRUNECASCADE_QUERY_TIMEOUT_S": "120",
        },
    )
    heavy = {"target": {"label": 1}, "k": 5, "mode": "cascade", "stages": [{"variant": "dense", "samples": 256}]}
    cheap = {"target": {"label": 2}, "k": 5, "mode": "exact"}
    try:
        assert wait_for(lambda: httpx.post(f"{server.url}/v1/query", json=cheap).status_code == 200, timeout=60)

        async def race() -> tuple[int, int, list[int]]:
            done: list[int] = []
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

                async def one(seed: int) -> int:
                    r = await client.post("/v1/query", json={**heavy, "seed": seed})
                    done.append(seed)
                    return r.status_code

                async def queued() -> float:
                    text = (await client.get("/metrics")).text
                    families = text_string_to_metric_families(text)
                    return sum(s.value for f in families for s in f.samples if s.name == "prunecascade_query_queued")

                tasks = [asyncio.create_task(one(seed)) for seed in range(12)]
                for _ in range(600):  # until most of them wait for a slot (bounded: the test fails, never hangs)
                    if await queued() >= 8:
                        break
                    await asyncio.sleep(0.01)
                r = await client.post("/v1/query", json=cheap)
                finished_before = len(done)
                statuses = await asyncio.gather(*tasks)
            return r.status_code, finished_before, statuses

        status, finished_before, statuses = asyncio.run(race())
        assert status == 200 and statuses == [200] * 12
        assert finished_before <= 4, finished_before  # one FIFO queue: at least 9 of the 12 would have finished
    finally:
        stop_server(server)
