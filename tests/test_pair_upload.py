"""A pair model is uploaded, gated on the space's pair probe, and activated like a classifier."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import load, save
from service_fixtures import AUTH, admin_server, entry_of, entry_payload, sha  # noqa: F401

from models.registry import MANIFEST_FILE, WEIGHTS_FILE


def _pair_entry(server) -> tuple[dict, bytes]:
    entry = entry_of(server, "pair-s25")
    return json.loads((entry / MANIFEST_FILE).read_text()), (entry / WEIGHTS_FILE).read_bytes()


def test_pair_model_upload_is_gated_and_activated(admin_server) -> None:
    url = admin_server.url
    manifest, _ = _pair_entry(admin_server)
    manifest = {**manifest, "name": "pair-copy"}
    entry = entry_of(admin_server, "pair-s25")
    r = httpx.post(f"{url}/v1/admin/models", files=entry_payload(entry, manifest), headers=AUTH)
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["flops_nonzero"] == manifest["flops_nonzero"] and 0.34 < up["accuracy"] <= 1.0  # above chance on pairs
    r = httpx.post(f"{url}/v1/admin/models/pair-copy/activate", json={"version": up["version"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    q = httpx.get(f"{url}/v1/space/queries", params={"limit": 1}).json()["queries"][0]
    stages = [{"variant": "pair-copy", "samples": 2, "keep": 10}, {"variant": "pair-dense", "samples": 4}]
    body = httpx.post(f"{url}/v1/query", json={"target": {"examples": [q["x"]]}, "k": 3, "stages": stages}).json()
    assert body["stages"][0]["variant"] == "pair-copy" and body["stages"][0]["version"] == up["version"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: {**m, "extra": {**m["extra"], "grade_prior": [1.0, 0.0]}}, "grade_prior"),
        (lambda m: {**m, "extra": {k: v for k, v in m["extra"].items() if k != "grade_prior"}}, "grade_prior"),
        (lambda m: {**m, "spec": {**m["spec"], "num_grades": 4}}, "manifest"),
        (lambda m: {**m, "spec": {**m["spec"], "trunk_channels": float("inf")}}, "manifest"),
        (lambda m: {**m, "flops_nonzero": m["flops_nonzero"] + 1}, "flops_nonzero"),
        (lambda m: {**m, "extra": {**m["extra"], "posterior_calibration": {"temperature": 0}}}, "temperature"),
        (lambda m: {**m, "extra": {**m["extra"], "posterior_calibration": "hot"}}, "temperature"),
    ],
)
def test_bad_pair_manifests_are_refused_naming_the_field(admin_server, change, field: str) -> None:
    manifest, _ = _pair_entry(admin_server)
    bad = change({**manifest, "name": "pair-bad"})
    files = entry_payload(entry_of(admin_server, "pair-s25"), bad)
    r = httpx.post(f"{admin_server.url}/v1/admin/models", files=files, headers=AUTH)
    assert 400 <= r.status_code < 500, r.text
    assert field in json.dumps(r.json()["detail"])
    assert all(m["name"] != "pair-bad" for m in httpx.get(f"{admin_server.url}/v1/models").json()["models"])


def test_a_pair_model_at_chance_fails_the_gate(admin_server) -> None:
    """The head says grade 0 whatever it reads: a third of the balanced probe pairs, chance level."""
    manifest, weights = _pair_entry(admin_server)
    tensors = {k: v.clone() for k, v in load(weights).items()}
    tensors["scorer.head.weight"].mul_(1e-6)  # nonzero (the FLOPs stay as claimed), but far below the bias
    tensors["scorer.head.bias"].copy_(torch.tensor([10.0, 0.0, 0.0]))
    data = save(tensors)
    bad = {**manifest, "name": "pair-chance", "sha256": sha(data)}
    files = entry_payload(entry_of(admin_server, "pair-s25"), bad, data)
    r = httpx.post(f"{admin_server.url}/v1/admin/models", files=files, headers=AUTH)
    assert r.status_code == 422 and "probe accuracy 0.3" in r.text and "chance" in r.text, r.text
