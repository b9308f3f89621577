"""Hot swap under load on a real server: queries run in threads while 20 activations and rollbacks happen.
No query may fail, and every answer's snapshot id must agree with the model versions it reports."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import httpx
from service_fixtures import AUTH, admin_server, entry_of, resaved_payload, served_versions  # noqa: F401

SWAPS = 20
WORKERS = 3
MAX_QUERIES_PER_WORKER = 400


def test_hot_swap_under_load(admin_server) -> None:
    url = admin_server.url
    r = httpx.post(
        f"{url}/v1/admin/models", files=resaved_payload(entry_of(admin_server, "cnn-s50"), "swap"), headers=AUTH
    )
    assert r.status_code == 201, r.text
    new = r.json()["version"]
    old = httpx.get(f"{url}/v1/admin/state", headers=AUTH).json()["active"]["cnn-s50"]

    answers: list[dict] = []
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def worker(w: int) -> None:
        with httpx.Client(timeout=30) as client:
            for i in range(MAX_QUERIES_PER_WORKER):
                if stop.is_set():
                    return
                # mode cascade: the swapped variant must answer (label targets are otherwise answered exactly)
                body = {"target": {"label": (w + i) % 10}, "k": 5, "seed": w * 100_000 + i, "mode": "cascade"}
                try:
                    resp = client.post(f"{url}/v1/query", json=body)
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    if resp.status_code != 200:
                        failures.append(f"{resp.status_code}: {resp.text[:200]}")
                    else:
                        answers.append(resp.json())

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    expected: dict[str, int] = {}  # snapshot id -> cnn-s50 version, as the admin answers report them
    try:
        with httpx.Client(timeout=60, headers=AUTH) as admin:
            for i in range(SWAPS):
                if i % 2 == 0:
                    r = admin.post(f"{url}/v1/admin/models/cnn-s50/activate", json={"version": new})
                else:
                    r = admin.post(f"{url}/v1/admin/models/cnn-s50/rollback")
                assert r.status_code == 200, r.text
                state = r.json()
                assert state["served"]["cnn-s50"] == (new if i % 2 == 0 else old)
                expected[state["snapshot_id"]] = state["served"]["cnn-s50"]
                time.sleep(0.05)  # let some queries land on each snapshot
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    assert not failures, failures[:5]
    assert len(answers) >= SWAPS
    versions_by_id: dict[str, set[tuple]] = defaultdict(set)
    for a in answers:
        versions_by_id[a["snapshot_id"]].add(served_versions(a))
    for sid, seen in versions_by_id.items():
        assert len(seen) == 1, f"snapshot {sid} answered with different versions: {seen}"
        (stages,) = seen
        if sid in expected:
            assert dict(stages)["cnn-s50"] == expected[sid]
    assert set(versions_by_id) <= set(expected), "an answer came from a snapshot no swap produced"
    assert {dict(next(iter(v)))["cnn-s50"] for v in versions_by_id.values()} == {old, new}

    final = httpx.get(f"{url}/v1/admin/state", headers=AUTH).json()
    assert final["active"]["cnn-s50"] == old
    assert httpx.delete(f"{url}/v1/admin/models/cnn-s50/versions/{new}", headers=AUTH).status_code == 204
