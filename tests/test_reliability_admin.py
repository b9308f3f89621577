"""Admin doors on a real server: a name keeps its kind, identical uploads sent at once store one version, the
token is checked before a multipart body is parsed, path ids are plain positive integers, and a gadget that
aggregates worse than the mean of the members' logits is refused."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors
from service_fixtures import AUTH, admin_server, entry_of, entry_payload, resaved_payload  # noqa: F401

from models.registry import MANIFEST_FILE, state_dict_for_saving
from models.spec import NetworkSpec


def _manifest(server, name: str) -> dict:
    return json.loads((entry_of(server, name) / MANIFEST_FILE).read_text())


@pytest.mark.parametrize(("source", "target"), [("pair-s25", "cnn-s50"), ("cnn-s50", "pair-s25")])
def test_a_name_keeps_its_kind(admin_server, source: str, target: str) -> None:
    before = {m["name"]: m["version"] for m in httpx.get(f"{admin_server.url}/v1/models").json()["models"]}
    manifest = {**_manifest(admin_server, source), "name": target}
    r = httpx.post(
        f"{admin_server.url}/v1/admin/models",
        files=entry_payload(entry_of(admin_server, source), manifest),
        headers=AUTH,
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "manifest", "name"]
    assert "needs another name" in r.json()["detail"][0]["msg"]
    after = {m["name"]: m["version"] for m in httpx.get(f"{admin_server.url}/v1/models").json()["models"]}
    assert after == before


def test_identical_uploads_sent_at_once_store_one_version(admin_server) -> None:
    payload = resaved_payload(entry_of(admin_server, "cnn-m20"), "sent six times at once")

    async def six() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=admin_server.url, timeout=120, headers=AUTH) as client:
            return await asyncio.gather(*(client.post("/v1/admin/models", files=payload) for _ in range(6)))

    responses = asyncio.run(six())
    assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses]
    assert sorted(r.status_code for r in responses) == [200] * 5 + [201]
    assert len({r.json()["version"] for r in responses}) == 1
    versions = [m for m in httpx.get(f"{admin_server.url}/v1/models").json()["models"] if m["name"] == "cnn-m20"]
    assert len({m["sha256"] for m in versions}) == len(versions)  # no two versions with one sha256


def test_the_token_is_checked_before_a_multipart_body_is_parsed(admin_server) -> None:
    broken = {"content-type": "multipart/form-data"}  # no boundary: unparseable
    r = httpx.post(f"{admin_server.url}/v1/admin/models", content=b"--x\r\n", headers=broken)
    assert r.status_code == 401, r.text
    r = httpx.post(f"{admin_server.url}/v1/admin/models", content=b"--x\r\n", headers={**broken, **AUTH})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("version", ["1_000", "+1", "%201", "1%20", "01", "1e3", "0x1"])
def test_path_ids_are_plain_positive_integers(admin_server, version: str) -> None:
    r = httpx.delete(f"{admin_server.url}/v1/admin/models/cnn-m20/versions/{version}", headers=AUTH)
    assert r.status_code == 422, r.text
    r = httpx.get(f"{admin_server.url}/v1/clusters/{version}")
    assert r.status_code == 422, r.text
    r = httpx.get(f"{admin_server.url}/v1/items/{version}")
    assert r.status_code == 422, r.text


def test_a_random_gadget_is_refused(admin_server) -> None:
    from models.gadget import GadgetSpec, build_gadget

    spec = NetworkSpec.from_dict(_manifest(admin_server, "cnn-m20")["spec"])
    torch.manual_seed(0)
    gadget = save_safetensors(
        state_dict_for_saving(build_gadget(GadgetSpec("lstm", spec.hidden_dim, spec.num_classes, 8)))
    )
    gadget_json = {
        "spec": {"kind": "lstm", "input_dim": spec.hidden_dim, "num_classes": spec.num_classes, "hidden_size": 8}
    }
    files = {
        **resaved_payload(entry_of(admin_server, "cnn-m20"), "with a random gadget"),
        "gadget": ("gadget.safetensors", gadget),
        "gadget_spec": ("gadget.json", json.dumps(gadget_json)),
    }
    r = httpx.post(f"{admin_server.url}/v1/admin/models", files=files, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "gadget"]
    assert "mean of the members' logits" in r.json()["detail"][0]["msg"]
