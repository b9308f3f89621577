"""In a real headless Chromium (Debian's `chromium`), /docs renders without network, and a query typed into its
"Try it out" form runs against the server and shows the same answer a direct request gets."""

from __future__ import annotations

import httpx
import pytest
from browser import chromium, try_query_in_docs
from conftest import Server

pytestmark = pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")


def test_a_query_can_be_tried_from_the_offline_docs(server: Server) -> None:
    body = {"target": {"label": 3}, "k": 5, "seed": 11}
    run = try_query_in_docs(server.url, body)
    assert run.failed_requests == []
    assert run.status == "200"
    direct = httpx.post(f"{server.url}/v1/query", json=body).json()
    assert [c["cluster_id"] for c in run.body["clusters"]] == [c["cluster_id"] for c in direct["clusters"]]
    assert len(run.body["clusters"]) == 5
    assert run.screenshot.startswith(b"\x89PNG")
