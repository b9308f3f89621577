"""`prunecascade serve --workers N` (service/workers.py): the workers are forked from the serving process, answer as
one worker does, a worker that dies is replaced while the others keep answering (from the home as it is on disk
then, not as the parent read it before forking: service/preload.py), and SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from service.loadtest.process_tree import children


def _ranking(body: dict) -> list[tuple]:
    return [(c["cluster_id"], c["score"], c["ranking_value"], c["posterior"]) for c in body["clusters"]]


def _answers(url: str, body: dict, count: int, timeout_s: float = 180.0) -> list[list[tuple]]:
    """`count` answers to `body` in a row (503s and refused connections while workers load are retried)."""
    return [_ranking(b) for b in _bodies(url, body, count, timeout_s)]


def _bodies(url: str, body: dict, count: int, timeout_s: float = 180.0) -> list[dict]:
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(out) < count:
        try:
            r = httpx.post(f"{url}/v1/query", json=body, timeout=30)
        except httpx.TransportError:
            time.sleep(0.3)
            continue
        if r.status_code == 200:
            out.append(r.json())
        else:
            time.sleep(0.3)
    return out


def _replace_all(pid: int, workers: list[int], timeout_s: float = 60.0) -> list[int]:
    for w in workers:
        os.kill(w, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = children(pid)
        if len(now) == len(workers) and not set(now) & set(workers):
            return now
        time.sleep(0.2)
    raise AssertionError(f"workers {workers} not replaced: {children(pid)}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_forked_workers_answer_alike_are_replaced_and_stop_on_sigterm(tiny_home, tmp_path, snapshot) -> None:
    from service_fixtures import copy_home, faiss_by_default, serve_with_workers

    home = copy_home(tiny_home, tmp_path / "home")
    body = {"target": {"examples": snapshot.queries.x[0:1].tolist()}, "k": 5, "seed": 3}
    with serve_with_workers(home, 2) as (proc, url):
        first = _answers(url, body, 20)
        assert len(first) == 20 and all(a == first[0] for a in first)
        workers = children(proc.pid)
        assert len(workers) == 2, workers  # forked by the serving process itself: no spawn helper beside them

        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (workers[0] in children(proc.pid) or len(children(proc.pid)) < 2):
            time.sleep(0.2)
        replaced = children(proc.pid)
        assert len(replaced) == 2 and workers[0] not in replaced and workers[1] in replaced
        after = _bodies(url, body, 10)
        assert [_ranking(b) for b in after] == [first[0]] * 10
        assert {b["mode"] for b in after} == {"cascade"}  # the tiny home's pair cascade

        # the parent read the home before forking; workers forked after it changed on disk read it again
        faiss_by_default(home)
        replaced = _replace_all(proc.pid, replaced)
        changed = _bodies(url, body, 10)
        assert len(changed) == 10 and {b["mode"] for b in changed} == {"faiss"}
        assert {b["snapshot_id"] for b in changed} != {b["snapshot_id"] for b in after}

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not any(_alive(w) for w in replaced)
