"""Two real uvicorn replicas sharing one home (the shared checkpoint volume) and a real redis-server: an
activation on one is live on the other within 2 s; with Redis killed queries still answer 200 and admin
changes apply locally; with Redis restarted (empty) the replicas converge again. A cluster reader uploaded to one
replica is served by the other, under the check the first pushed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import Server, start_server, stop_server
from service_fixtures import (  # noqa: F401
    AUTH,
    QUERY,
    RedisProc,
    admin_env,
    copy_home,
    entry_of,
    entry_payload,
    faiss_by_default,
    redis_proc,
    resaved_payload,
    wait_for,
)

from cascade.queries import QuerySet
from models.cluster_reader_store import READER_SPEC, stored_digest, weights_file
from service.cli import main as cli

STAGES = [{"variant": "cnn-m20", "samples": 2, "keep": 20}, {"variant": "dense", "samples": 4}]


def _served(server: Server) -> dict[str, int] | None:
    try:
        return httpx.get(f"{server.url}/v1/admin/state", headers=AUTH, timeout=5).json()["served"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def _metric(server: Server, prefix: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture
def replicas(tiny_home: Path, tmp_path: Path, redis_proc: RedisProc) -> Iterator[tuple[Server, Server]]:
    home = faiss_by_default(copy_home(tiny_home, tmp_path / "shared-home"))  # a reader's check: against FAISS
    env = admin_env(
        PRUNECASCADE_REDIS_URL=redis_proc.url,
        PRUNECASCADE_RECONCILE_INTERVAL_S="0.5",
        PRUNECASCADE_REDIS_RETRY_S="0.2",
        PRUNECASCADE_REDIS_PREFIX=f"t{tmp_path.name[-12:]}",
    )
    a = start_server(home, env)
    try:
        b = start_server(home, env)
    except Exception:
        stop_server(a)
        raise
    yield a, b
    stop_server(a)
    stop_server(b)


def test_replicas_converge_through_redis_and_survive_its_loss(replicas, redis_proc: RedisProc) -> None:
    a, b = replicas
    old = _served(a)["cnn-m20"]
    assert _served(b)["cnn-m20"] == old

    # an upload on A lands on the shared volume; its activation is live on B within 2 s. The tensors are
    # re-saved with a note: other bytes, so a new version (identical bytes answer the stored one).
    files = resaved_payload(entry_of(a, "cnn-m20"), "redis")
    r = httpx.post(f"{a.url}/v1/admin/models", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    new = r.json()["version"]
    r = httpx.post(f"{a.url}/v1/admin/models/cnn-m20/activate", json={"version": new}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert wait_for(lambda: (_served(b) or {}).get("cnn-m20") == new, timeout=2.0), _served(b)
    body = {**QUERY, "stages": STAGES}
    qa = httpx.post(f"{a.url}/v1/query", json=body).json()
    qb = httpx.post(f"{b.url}/v1/query", json=body)
    assert qb.json()["snapshot_id"] == qa["snapshot_id"] and qb.json()["stages"][0]["version"] == new
    # the result cache is shared: B's answer to the very query A computed came from Redis
    assert qb.headers.get("x-cache") == "hit" and qb.json()["cached"] is True
    assert _metric(b, 'prunecascade_cache_hits_total{backend="redis"}') >= 1

    # Redis slow (blocked for longer than the client timeout): queries still answer, without the cache
    slow = threading.Thread(
        target=lambda: redis.Redis.from_url(redis_proc.url).execute_command("DEBUG", "SLEEP", "1.5")
    )
    slow.start()
    time.sleep(0.2)
    q = httpx.post(f"{a.url}/v1/query", json={**QUERY, "seed": 999}, timeout=30)
    assert q.status_code == 200 and q.json()["cached"] is False
    slow.join(10)

    # Redis dies: queries still answer, admin changes still apply locally
    redis_proc.kill()
    for i in range(6):
        for s in (a, b):
            q = httpx.post(f"{s.url}/v1/query", json={**QUERY, "seed": 1000 + i}, timeout=30)
            assert q.status_code == 200, q.text
    r = httpx.post(f"{a.url}/v1/admin/models/cnn-m20/rollback", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert _served(a)["cnn-m20"] == old
    assert _served(b)["cnn-m20"] == new  # B cannot hear about it yet
    assert _metric(a, "prunecascade_redis_errors_total") >= 1
    assert _metric(a, "prunecascade_redis_up ") == 0

    # Redis is back (empty): A pushes its pending change, B adopts it
    redis_proc.start()
    assert wait_for(lambda: (_served(b) or {}).get("cnn-m20") == old, timeout=15.0), _served(b)
    assert _served(a) == _served(b)
    assert wait_for(lambda: _metric(a, "prunecascade_redis_up ") == 1, timeout=5.0)
    assert httpx.post(f"{b.url}/v1/query", json=body).json()["stages"][0]["version"] == old


def test_a_reader_uploaded_to_one_replica_is_served_by_the_other(replicas, tiny_home: Path, tmp_path: Path) -> None:
    a, b = replicas
    trained = faiss_by_default(copy_home(tiny_home, tmp_path / "trainer"))
    assert cli(["reader", "--home", str(trained), "--steps", "50"]) == 0  # served on the tiny home's dev check
    space = trained / "spaces" / "default"
    digest = stored_digest(space)
    files = {
        "spec": ("reader.json", (space / READER_SPEC).read_bytes()),
        "weights": ("reader.safetensors", (space / weights_file(digest)).read_bytes()),
    }
    example = QuerySet.load(space).split("dev").x[0].tolist()
    query = {"target": {"examples": [example]}, "k": 3}

    def reader_of(server: Server) -> str | None:
        reader = httpx.get(f"{server.url}/v1/space", timeout=10).json()["reader"]
        return reader["sha256"] if reader is not None and reader["served"] else None

    assert reader_of(a) is None and reader_of(b) is None
    assert httpx.post(f"{b.url}/v1/query", json=query, timeout=30).json()["mode"] != "reader"
    r = httpx.post(f"{a.url}/v1/admin/reader", files=files, headers=AUTH, timeout=120)
    assert r.status_code == 201, r.text
    assert reader_of(a) == digest
    # B reads the files A stored beside the shared space, under the check A pushed with the config
    assert wait_for(lambda: reader_of(b) == digest, timeout=5.0), httpx.get(f"{b.url}/v1/space").json()["reader"]
    assert httpx.post(f"{b.url}/v1/query", json=query, timeout=30).json()["mode"] == "reader"
