"""End to end: real uvicorn on a free loopback port serving a tiny bootstrapped home, queried with httpx."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from cascade.space import Space

# Measured on the tiny home (tests/conftest.py): every label query put only clusters of that label in its
# top 10 (recall@10 = 1.0 for all 10 labels). The floor leaves room for seed-to-seed sampling noise.
RECALL_FLOOR = 0.9


def test_health_readiness_and_catalog(server) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["ready"] is True
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    assert {m["name"] for m in models if m["active"]} >= {"dense", "cnn-s50", "cnn-m20"}
    cascade = httpx.get(f"{server.url}/v1/cascade").json()
    assert [s["variant"] for s in cascade["stages"]] == ["cnn-s50", "dense"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    assert "/v1/query" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_label_queries_return_that_label_and_flops_add_up(server) -> None:
    space = Space.load(server.home / "spaces" / "default")
    recalls = []
    for label in range(space.num_classes):
        query = {"target": {"label": label}, "k": 10, "seed": label, "mode": "cascade"}
        r = httpx.post(f"{server.url}/v1/query", json=query)
        assert r.status_code == 200, r.text
        body = r.json()
        ids = np.array([c["cluster_id"] for c in body["clusters"]])
        recalls.append(float((space.cluster_labels[ids] == label).mean()))
        assert body["flops"] == sum(s["flops"] for s in body["stages"])
        assert body["dense_flops"] > body["flops"]
        assert [s["aggregator"] for s in body["stages"]] == ["bayes", "bayes"]
        for c in body["clusters"]:
            assert math.isclose(sum(c["posterior"]), 1.0, rel_tol=1e-4)
    assert np.mean(recalls) >= RECALL_FLOOR


def test_utility_and_example_queries_and_stage_override(server) -> None:
    space = Space.load(server.home / "spaces" / "default")
    utility = [0.0] * space.num_classes
    utility[6] = 1.0
    r = httpx.post(f"{server.url}/v1/query", json={"target": {"utility": utility}, "k": 3})
    assert r.status_code == 200 and len(r.json()["clusters"]) == 3
    rows = np.flatnonzero(space.labels == 2)[:2]
    examples = space.features[rows].tolist()
    stages = [
        {"variant": "pair-s25", "samples": 3, "keep": 12, "aggregator": "mean_prob"},
        {"variant": "pair-dense", "samples": 4},
    ]
    r = httpx.post(f"{server.url}/v1/query", json={"target": {"examples": examples}, "k": 4, "stages": stages})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["variant"] for s in body["stages"]] == ["pair-s25", "pair-dense"]
    assert body["stages"][0]["aggregator"] == "mean_prob" and body["target_flops"] > 0
    assert (space.cluster_labels[[c["cluster_id"] for c in body["clusters"]]] == 2).mean() >= 0.5


BAD = [
    ({"target": {"examples": [[0.0] * 3]}}, "examples"),
    ({"target": {"label": 99}}, "label"),
    ({"target": {"label": -1}}, "label"),
    ({"target": {"label": 1, "utility": [1.0]}}, "target"),
    ({"target": {}}, "target"),
    ({"target": {"label": 1}, "k": 0}, "k"),
    ({"target": {"label": 1}, "k": 100_000}, "k"),
    ({"target": {"label": 1}, "stages": [{"variant": "ghost", "samples": 2}]}, "variant"),
    ({"target": {"label": 1}, "stages": [{"variant": "dense", "samples": 0}]}, "samples"),
    ({"target": {"label": 1}, "stages": [{"variant": "dense", "samples": 2, "aggregator": "vote"}]}, "aggregator"),
    ({"target": {"utility": [1.0, 2.0]}}, "utility"),
    ({"target": {"label": 1}, "extra": 1}, "extra"),
]


@pytest.mark.parametrize(("body", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_queries_get_4xx_naming_the_field(server, body, field) -> None:
    r = httpx.post(f"{server.url}/v1/query", json=body)
    assert r.status_code == 422, r.text
    assert field in r.text


def test_nan_and_infinity_are_refused(server) -> None:
    space = Space.load(server.home / "spaces" / "default")
    row = ", ".join(["0.5"] * (space.input_dim - 1))
    for bad in ("NaN", "Infinity"):
        content = f'{{"target": {{"examples": [[{bad}, {row}]]}}, "k": 2}}'
        r = httpx.post(f"{server.url}/v1/query", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert "examples" in r.text


@pytest.mark.parametrize("media", ["application/x-www-form-urlencoded", "text/plain; charset=utf-8", None])
def test_a_json_body_sent_as_another_media_type_is_a_415_saying_what_to_send(server, media) -> None:
    body = b'{"target": {"label": 0}, "k": 1}'
    r = httpx.post(f"{server.url}/v1/query", content=body, headers={"content-type": media} if media else {})
    assert r.status_code == 415, r.text
    (item,) = r.json()["detail"]
    assert "Content-Type: application/json" in item["msg"]
    assert (media.split(";")[0] if media else "without one") in item["msg"]
    assert item["type"] == "unsupported_media_type"
    # the same bytes sent as JSON are answered
    for headers in ({"content-type": "application/json"}, {"content-type": "application/vnd.api+json"}):
        assert httpx.post(f"{server.url}/v1/query", content=body, headers=headers).status_code == 200, headers
    # JSON that is not an object is still the 422 naming the body
    r = httpx.post(f"{server.url}/v1/query", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]


def test_oversized_and_malformed_bodies(server) -> None:
    huge = b'{"target": {"examples": [[' + b"0.1, " * 400_000 + b"0.1]]}}"
    r = httpx.post(f"{server.url}/v1/query", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.text

    def chunks():
        for _ in range(100):
            yield b" " * 20_000

    r = httpx.post(f"{server.url}/v1/query", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(f"{server.url}/v1/query", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    # the server is still healthy after all of it
    assert httpx.post(f"{server.url}/v1/query", json={"target": {"label": 0}, "k": 1}).status_code == 200
