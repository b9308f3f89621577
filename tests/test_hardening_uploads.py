"""Uploads on a real server: uploads that used to end in 500 are 4xx naming the field and counted, manifests
are finite and a broken one on disk breaks nothing, safetensors whose header starts with 0x80 are accepted, the
parameter budget refuses a huge spec before allocating, identical bytes answer the stored
version, and random weights fail the accuracy gate relative to the dense model."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from service_fixtures import AUTH, admin_server, entry_of, sha  # noqa: F401

from models.flops import count_flops
from models.networks import build_network
from models.registry import MANIFEST_FILE, WEIGHTS_FILE, state_dict_for_saving
from models.spec import NetworkSpec


def _entry(server, name: str = "cnn-m20") -> tuple[dict, bytes]:
    d = entry_of(server, name)
    return json.loads((d / MANIFEST_FILE).read_text()), (d / WEIGHTS_FILE).read_bytes()


def _post(server, manifest: bytes | dict, weights: bytes, **extra: tuple[str, bytes]) -> httpx.Response:
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    files = {"manifest": ("manifest.json", raw), "weights": ("weights.safetensors", weights), **extra}
    return httpx.post(f"{server.url}/v1/admin/models", files=files, headers=AUTH, timeout=60)


def _uploads(server) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for s in family.samples:
            if s.name == "prunecascade_uploads_total":
                out[s.labels["outcome"]] = s.value
    return out


def _listing(server) -> list[dict]:
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 200, r.text
    return r.json()["models"]


def _fields(body: dict) -> str:
    return json.dumps([".".join(map(str, d["loc"])) + ": " + d["msg"] for d in body["detail"]])


def _no_kind(m: dict) -> bytes:
    return json.dumps({**m, "spec": {k: v for k, v in m["spec"].items() if k != "kind"}}).encode()


def _infinite_input_dim(m: dict) -> bytes:
    return json.dumps({**m, "spec": {**m["spec"], "input_dim": math.inf}}).encode()  # writes `Infinity`


def _deep(m: dict) -> bytes:
    return (
        json.dumps({**m, "extra": {}}).encode().replace(b'"extra": {}', b'"extra": ' + b"[" * 100_000 + b"]" * 100_000)
    )


def _long_int(m: dict) -> bytes:
    return (
        json.dumps({**m, "flops_nonzero": 0})
        .encode()
        .replace(b'"flops_nonzero": 0', b'"flops_nonzero": ' + b"7" * 5000)
    )


def _infinite_deviation(m: dict) -> bytes:
    return json.dumps({**m, "output_deviation": math.inf}).encode()


def _nan_in_extra(m: dict) -> bytes:
    return json.dumps({**m, "extra": {"note": math.nan}}).encode()


MANIFEST_CASES = [
    (_no_kind, "kind"),
    (_infinite_input_dim, "input_dim"),
    (_deep, "deeply"),
    (_long_int, "digits"),
    (_infinite_deviation, "output_deviation"),
    (_nan_in_extra, "extra"),
]


@pytest.mark.parametrize(("make", "needle"), MANIFEST_CASES, ids=[c[0].__name__ for c in MANIFEST_CASES])
def test_manifests_that_used_to_500_are_422_and_counted(admin_server, make, needle: str) -> None:
    manifest, weights = _entry(admin_server)
    before_list, before = _listing(admin_server), _uploads(admin_server).get("refused", 0)
    r = _post(admin_server, make(manifest), weights)
    assert r.status_code == 422, r.text
    assert needle in _fields(r.json()) and "manifest" in _fields(r.json())
    assert _uploads(admin_server).get("refused", 0) == before + 1
    assert _listing(admin_server) == before_list


def _gadget_payload(server, spec: dict) -> dict[str, tuple[str, bytes]]:
    manifest = _entry(server)[0]
    net = NetworkSpec.from_dict(manifest["spec"])
    gadget = save_safetensors({"w": torch.zeros(2)})
    body = {"spec": {"kind": "lstm", "input_dim": net.hidden_dim, "num_classes": net.num_classes, **spec}}
    raw = json.dumps(body).encode()
    return {"gadget": ("gadget.safetensors", gadget), "gadget_spec": ("gadget.json", raw)}


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"hidden_size": math.inf}, "hidden_size"),
        ({"hidden_size": 1e7}, "hidden_size"),
        ({"hidden_size": 100_000}, "budget"),
        ({"hidden_size": "8"}, "hidden_size"),
        ({"kind": None}, "kind"),
    ],
)
def test_gadget_specs_that_used_to_500_are_422_and_counted(admin_server, spec: dict, needle: str) -> None:
    manifest, weights = _entry(admin_server)
    before = _uploads(admin_server).get("refused", 0)
    started = time.monotonic()
    r = _post(admin_server, manifest, weights, **_gadget_payload(admin_server, spec))
    assert r.status_code == 422, r.text
    assert "gadget_spec" in _fields(r.json()) and needle in _fields(r.json())
    assert time.monotonic() - started < 10  # refused from the spec, nothing allocated
    assert _uploads(admin_server).get("refused", 0) == before + 1


def _rss_kb(server) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def test_parameter_budget_refuses_a_huge_spec_before_allocating(admin_server) -> None:
    manifest, weights = _entry(admin_server)
    huge = {**manifest, "spec": {**manifest["spec"], "hidden": [1_000_000, 1_000_000]}}
    rss_before = _rss_kb(admin_server)
    started = time.monotonic()
    r = _post(admin_server, huge, weights)
    assert r.status_code == 422, r.text
    assert "budget" in r.text and "manifest.spec" in _fields(r.json())
    assert time.monotonic() - started < 10
    assert _rss_kb(admin_server) - rss_before < 200_000  # 10^12 parameters were never allocated


def test_a_header_starting_with_0x80_is_safetensors_not_a_pickle(admin_server) -> None:
    """The cnn-m20 weights re-saved with a metadata note that makes the header 128 + 256 k bytes long."""
    manifest, weights = _entry(admin_server)
    tensors = dict(load_safetensors(weights))
    for pad in range(0, 512):
        data = save_safetensors(tensors, metadata={"note": "n" * pad})
        if int.from_bytes(data[:8], "little") % 256 == 128:
            break
    assert data[:1] == b"\x80"
    r = _post(admin_server, {**manifest, "sha256": sha(data)}, data)
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    assert (
        httpx.delete(f"{admin_server.url}/v1/admin/models/cnn-m20/versions/{version}", headers=AUTH).status_code == 204
    )


def test_identical_bytes_answer_the_stored_version(admin_server) -> None:
    manifest, weights = _entry(admin_server)
    active = httpx.get(f"{admin_server.url}/v1/admin/state", headers=AUTH).json()["active"]["cnn-m20"]
    versions_before = [m["version"] for m in _listing(admin_server) if m["name"] == "cnn-m20"]
    for _ in range(3):
        r = _post(admin_server, manifest, weights)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == active and r.json()["active"] is True
    assert [m["version"] for m in _listing(admin_server) if m["name"] == "cnn-m20"] == versions_before


def test_random_weights_under_a_new_name_fail_the_relative_accuracy_gate(admin_server) -> None:
    manifest = _entry(admin_server)[0]
    spec = NetworkSpec.from_dict(manifest["spec"])
    torch.manual_seed(0)
    model = build_network(spec)
    flops = count_flops(model, spec.input_dim)
    data = save_safetensors(state_dict_for_saving(model))
    fresh = {
        **manifest,
        "name": "fresh-random",
        "sha256": sha(data),
        "flops_dense_kernel": flops.dense_kernel,
        "flops_nonzero": flops.nonzero,
    }
    r = _post(admin_server, fresh, data)
    assert r.status_code == 422, r.text
    assert "RELATIVE_ACCURACY_FLOOR" in r.text and "dense" in r.text
    assert all(m["name"] != "fresh-random" for m in _listing(admin_server))


def test_a_broken_manifest_on_disk_is_listed_and_refused_not_a_500(admin_server) -> None:
    """What the old server stored for `"output_deviation": Infinity` (null) must not break the listing."""
    url = admin_server.url
    manifest, weights = _entry(admin_server)
    data = save_safetensors(dict(load_safetensors(weights)), metadata={"copy": "broken"})
    r = _post(admin_server, {**manifest, "sha256": sha(data)}, data)
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    path = entry_of(admin_server, "cnn-m20", version) / MANIFEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "output_deviation": None}))

    listed = {(m["name"], m["version"]): m for m in _listing(admin_server)}
    assert "output_deviation" in listed[("cnn-m20", version)]["broken"]
    r = httpx.post(f"{url}/v1/admin/models/cnn-m20/activate", json={"version": version}, headers=AUTH)
    assert r.status_code == 409, r.text
    assert "broken" in r.text and r.json()["detail"][0]["loc"] == ["body", "version"]
    assert httpx.post(f"{url}/v1/query", json={"target": {"label": 1}, "k": 3}).status_code == 200
    assert httpx.delete(f"{url}/v1/admin/models/cnn-m20/versions/{version}", headers=AUTH).status_code == 204
    assert ("cnn-m20", version) not in {(m["name"], m["version"]) for m in _listing(admin_server)}
