"""Locust scenario for prunecascade, for users who prefer Locust's UI to `prunecascade loadtest`.

    locust -f deploy/locustfile.py --host http://127.0.0.1:8000 --users 20 --spawn-rate 5 --run-time 60s

Locust users are closed-loop (each waits for its answer before the next request), so a saturated server
slows the arrival rate down and hides part of its tail; `prunecascade loadtest` measures in open loop and
also scores recall@k and agreement@k. Knobs (environment): PRUNECASCADE_LOCUST_K (default 10),
PRUNECASCADE_LOCUST_STAGES (a JSON list of stages; default: the service's default cascade),
PRUNECASCADE_LOCUST_RATE (requests per second per user, default 1)."""

from __future__ import annotations

import json
import os
import random
from typing import Any

from locust import HttpUser, constant_throughput, events, task

__all__ = ["CascadeUser"]

K = int(os.environ.get("PRUNECASCADE_LOCUST_K", "10"))
STAGES: list[dict[str, Any]] | None = json.loads(os.environ.get("PRUNECASCADE_LOCUST_STAGES", "null"))
RATE = float(os.environ.get("PRUNECASCADE_LOCUST_RATE", "1"))
NUM_CLASSES = 10  # replaced by GET /v1/space at test start


@events.test_start.add_listener
def _learn_space(environment: Any, **_kwargs: Any) -> None:
    """Query only labels the served space has."""
    global NUM_CLASSES
    import urllib.request

    if environment.host:
        with urllib.request.urlopen(f"{environment.host.rstrip('/')}/v1/space", timeout=10) as r:
            NUM_CLASSES = int(json.load(r)["num_classes"])


class CascadeUser(HttpUser):
    wait_time = constant_throughput(RATE)

    @task(10)
    def label_query(self) -> None:
        body: dict[str, Any] = {
            "target": {"label": random.randrange(NUM_CLASSES)},
            "k": K,
            "seed": random.getrandbits(31),
        }
        if STAGES is not None:
            body["stages"] = STAGES
        with self.client.post("/v1/query", json=body, name="/v1/query [label]", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            clusters = r.json().get("clusters", [])
            if len(clusters) != K:
                r.failure(f"expected {K} clusters, got {len(clusters)}")

    @task(1)
    def catalog(self) -> None:
        self.client.get("/v1/cascade")
