"""The exact path over HTTP: label and utility targets are answered from the dense cluster posteriors once the
table is built (before that by the cascade, and the response says which), with no dependence on the seed."""

from __future__ import annotations

import time

import httpx
import pytest


def _query(server, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v1/query", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_for_exact(server, deadline_s: float = 60.0) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        body = _query(server, {"target": {"label": 5}, "k": 5, "seed": int(time.monotonic() * 1000)})
        if body["mode"] == "exact":
            return body
        assert body["mode"] == "cascade"  # until the table is ready, the cascade answers
        time.sleep(0.2)
    pytest.fail("the exact table was not ready in time")


def test_label_targets_are_answered_exactly_and_the_oracle_ranking_is_shown(server) -> None:
    body = _wait_for_exact(server)
    (stage,) = body["stages"]
    assert stage["aggregator"] == "exact" and stage["items"] == 0
    assert body["ranking"] == "utility_log_odds" and body["flops"] < body["dense_flops"] / 100
    values = [c["ranking_value"] for c in body["clusters"]]
    assert values == sorted(values, reverse=True)
    cascade = _query(server, {"target": {"label": 5}, "k": 5, "mode": "cascade"})
    assert cascade["mode"] == "cascade" and len(cascade["stages"]) == 2
    space = httpx.get(f"{server.url}/v1/space").json()
    assert space["exact"]["state"] == "ready" and space["exact"]["build_flops"] == body["dense_flops"]
    assert space["exact"]["bytes"] == space["num_clusters"] * space["num_classes"] * 4
    assert space["held_out_queries"] > 0 and space["num_grades"] == 3 and space["clusters"] == "prototypes"


def test_exact_answers_take_no_seed(server) -> None:
    _wait_for_exact(server)
    first = httpx.post(f"{server.url}/v1/query", json={"target": {"label": 2}, "k": 3, "seed": 11})
    second = httpx.post(f"{server.url}/v1/query", json={"target": {"label": 2}, "k": 3, "seed": 12})
    assert first.json()["mode"] == "exact" and second.headers.get("x-cache") == "hit"
    assert [c["cluster_id"] for c in first.json()["clusters"]] == [c["cluster_id"] for c in second.json()["clusters"]]


def test_mode_exact_and_a_utility(server) -> None:
    _wait_for_exact(server)
    utility = [0.0] * 10
    utility[7], utility[1] = 1.0, 0.5
    body = _query(server, {"target": {"utility": utility}, "k": 4, "mode": "exact"})
    assert body["mode"] == "exact" and body["ranking"] == "utility_log_odds"
    scores = [c["score"] for c in body["clusters"]]
    assert scores == sorted(scores, reverse=True)  # the shortfall ranks as the expected utility does
    values = [c["ranking_value"] for c in body["clusters"]]
    assert values == sorted(values, reverse=True)
