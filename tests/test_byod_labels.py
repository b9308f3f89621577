"""Label targets in the user's labels (needs `target_from_label` to map through `Space.class_of`)."""

from __future__ import annotations

import httpx
from conftest import Server
from test_byod_http import byod_home, byod_server  # noqa: F401


def test_labels_are_the_users_and_an_unknown_one_lists_the_valid_ones(byod_server: Server) -> None:
    url = byod_server.url
    for mode in ("exact", "cascade"):
        r = httpx.post(f"{url}/v1/query", json={"target": {"label": 7}, "k": 4, "mode": mode})
        assert r.status_code == 200, r.text
        for hit in r.json()["clusters"]:
            assert httpx.get(f"{url}/v1/clusters/{hit['cluster_id']}").json()["label"] == 7
    bad = httpx.post(f"{url}/v1/query", json={"target": {"label": 3}, "k": 4})
    assert bad.status_code == 422
    assert bad.json()["detail"] == [
        {
            "loc": ["body", "target", "label"],
            "msg": "unknown label 3; this space's labels are 2, 7, 9",
            "type": "value_error",
        }
    ]
