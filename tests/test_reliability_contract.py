"""Small contract mends on a real server: one limit on examples per query, grades described wherever there are
pair models, and a vector of the wrong length answered with how many values were sent."""

from __future__ import annotations

import httpx
import pytest
from conftest import Server


def _example(server: Server) -> list[float]:
    return httpx.get(f"{server.url}/v1/space/queries", params={"limit": 1}).json()["queries"][0]["x"]


@pytest.mark.parametrize("count", [65, 1025])
def test_one_limit_on_examples_per_query(server: Server, count: int) -> None:
    r = httpx.post(f"{server.url}/v1/query", json={"target": {"examples": [_example(server)] * count}, "k": 3})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["msg"] == "at most 64 examples per query", r.text


def test_space_describes_its_grades(server: Server) -> None:
    space = httpx.get(f"{server.url}/v1/space").json()
    assert space["num_grades"] == 3
    grades = space["grades"]
    assert grades is not None and grades["num_grades"] == 3
    assert grades["names"] == ["other", "same_label", "same_cluster"] and grades["gains"] == [0.0, 1.0, 3.0]


def test_a_wrong_vector_length_says_how_many_were_sent(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/query", json={"target": {"examples": [[0.5, 0.1, 0.2]]}, "k": 3})
    assert r.status_code == 422 and r.json()["detail"][0]["msg"].endswith("features; got 3"), r.text
    body = {"target": {"examples": [_example(server)], "gains": [0, 1]}, "k": 3}
    r = httpx.post(f"{server.url}/v1/query", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["msg"].endswith("; got 2"), r.text
    r = httpx.post(f"{server.url}/v1/query", json={"target": {"utility": [1.0, 2.0]}, "k": 3})
    assert r.status_code == 422 and "got 2" in r.json()["detail"][0]["msg"], r.text
