"""Uploads on a real server: every bad checkpoint class gets its 4xx and leaves the served snapshot exactly
as it was; a good one is stored inactive, activated, rolled back and deleted; `prunecascade push` works."""

from __future__ import annotations

import io
import json
import pickle

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors
from service_fixtures import (  # noqa: F401
    AUTH,
    MAX_UPLOAD,
    QUERY,
    TOKEN,
    admin_server,
    entry_of,
    entry_payload,
    sha,
)

from models.flops import count_flops
from models.networks import build_network
from models.registry import MANIFEST_FILE, WEIGHTS_FILE, state_dict_for_saving
from models.spec import NetworkSpec
from service.commands.push import push


def _manifest(server, name: str = "cnn-m20") -> dict:
    return json.loads((entry_of(server, name) / MANIFEST_FILE).read_text())


def _weights(server, name: str = "cnn-m20") -> bytes:
    return (entry_of(server, name) / WEIGHTS_FILE).read_bytes()


def _tensors(server, name: str = "cnn-m20") -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return dict(load(_weights(server, name)))


def _with_weights(server, tensors: dict[str, torch.Tensor], **manifest_changes) -> tuple[dict, bytes]:
    data = save_safetensors(tensors)
    return {**_manifest(server), "sha256": sha(data), **manifest_changes}, data


def bad_sha(server):
    return {**_manifest(server), "sha256": "0" * 64}, _weights(server)


def pickled(server):
    buf = io.BytesIO()
    torch.save(_tensors(server), buf)
    data = buf.getvalue()
    return {**_manifest(server), "sha256": sha(data)}, data


def raw_pickle(server):
    data = pickle.dumps({"weights": [1.0, 2.0]})
    return {**_manifest(server), "sha256": sha(data)}, data


def garbage(server):
    data = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 32
    return {**_manifest(server), "sha256": sha(data)}, data


def spec_does_not_build(server):
    m = _manifest(server)
    return {**m, "spec": {**m["spec"], "kind": "transformer"}}, _weights(server)


def wrong_shape(server):
    t = _tensors(server)
    name = "head.weight"
    t[name] = torch.zeros(t[name].shape[0], t[name].shape[1] + 1)
    return _with_weights(server, t)


def missing_tensor(server):
    t = _tensors(server)
    t.pop("head.bias")
    return _with_weights(server, t)


def extra_tensor(server):
    return _with_weights(server, {**_tensors(server), "backdoor.weight": torch.zeros(2, 2)})


def wrong_dtype(server):
    return _with_weights(server, {k: v.double() for k, v in _tensors(server).items()})


def nan_weights(server):
    t = _tensors(server)
    t["head.weight"] = t["head.weight"].clone()
    t["head.weight"][0, 0] = float("nan")
    return _with_weights(server, t)


def inf_weights(server):
    t = _tensors(server)
    t["head.bias"] = t["head.bias"].clone()
    t["head.bias"][0] = float("inf")
    return _with_weights(server, t)


def _other_space_model(server, **spec_changes):
    spec = NetworkSpec.from_dict({**_manifest(server)["spec"], **spec_changes})
    torch.manual_seed(0)
    model = build_network(spec)
    flops = count_flops(model, spec.input_dim)
    data = save_safetensors(state_dict_for_saving(model))
    m = {
        **_manifest(server),
        "spec": spec.to_dict(),
        "sha256": sha(data),
        "flops_dense_kernel": flops.dense_kernel,
        "flops_nonzero": flops.nonzero,
    }
    return m, data


def wrong_input_size(server):
    return _other_space_model(server, input_dim=_manifest(server)["spec"]["input_dim"] * 2)


def wrong_classes(server):
    return _other_space_model(server, num_classes=3)


def flops_lie(server):
    m = _manifest(server)
    return {**m, "flops_nonzero": m["flops_nonzero"] // 10}, _weights(server)


def accuracy_drop(server):
    """Untrained weights of the right spec, honest FLOPs: only the accuracy gate can refuse them."""
    return _other_space_model(server)


def bad_manifest_json(server):
    return None, _weights(server)


def unknown_manifest_field(server):
    return {**_manifest(server), "trust_me": True}, _weights(server)


def bad_name(server):
    return {**_manifest(server), "name": "../../etc"}, _weights(server)


BAD = [
    (bad_sha, 422, "sha256"),
    (pickled, 415, "weights"),
    (raw_pickle, 415, "pickle"),
    (garbage, 415, "safetensors"),
    (spec_does_not_build, 422, "spec"),
    (wrong_shape, 422, "head.weight"),
    (missing_tensor, 422, "head.bias"),
    (extra_tensor, 422, "backdoor.weight"),
    (wrong_dtype, 422, "dtype"),
    (nan_weights, 422, "NaN"),
    (inf_weights, 422, "Inf"),
    (wrong_input_size, 422, "input_dim"),
    (wrong_classes, 422, "num_classes"),
    (flops_lie, 422, "flops_nonzero"),
    (accuracy_drop, 422, "accuracy"),
    (bad_manifest_json, 422, "manifest"),
    (unknown_manifest_field, 422, "trust_me"),
    (bad_name, 422, "name"),
]


def _snapshot_state(server) -> tuple[dict, dict]:
    q = httpx.post(f"{server.url}/v1/query", json={**QUERY, "seed": 99}, headers={"x-no": "1"}, timeout=30)
    assert q.status_code == 200, q.text
    body = q.json()
    body.pop("latency_ms")
    body.pop("cached")
    versions = httpx.get(f"{server.url}/v1/admin/state", headers=AUTH).json()
    return body, versions


@pytest.mark.parametrize(("make", "status", "needle"), BAD, ids=[b[0].__name__ for b in BAD])
def test_bad_checkpoint_is_refused_and_changes_nothing(admin_server, make, status, needle) -> None:
    before = _snapshot_state(admin_server)
    listing = httpx.get(f"{admin_server.url}/v1/models").json()
    manifest, weights = make(admin_server)
    files = {
        "manifest": ("manifest.json", b"{nope" if manifest is None else json.dumps(manifest).encode()),
        "weights": ("weights.safetensors", weights),
    }
    r = httpx.post(f"{admin_server.url}/v1/admin/models", files=files, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.text
    assert httpx.get(f"{admin_server.url}/v1/models").json() == listing  # nothing stored
    assert _snapshot_state(admin_server) == before  # the same query answers identically


def test_oversized_upload_is_413_and_changes_nothing(admin_server) -> None:
    before = _snapshot_state(admin_server)
    files = entry_payload(entry_of(admin_server, "cnn-m20"), weights=b"\x00" * (MAX_UPLOAD + 1))
    r = httpx.post(f"{admin_server.url}/v1/admin/models", files=files, headers=AUTH, timeout=60)
    assert r.status_code == 413, r.text
    assert _snapshot_state(admin_server) == before


def test_gadget_without_its_spec_is_refused(admin_server) -> None:
    files = {**entry_payload(entry_of(admin_server, "cnn-m20")), "gadget": ("gadget.safetensors", b"xx")}
    r = httpx.post(f"{admin_server.url}/v1/admin/models", files=files, headers=AUTH, timeout=60)
    assert r.status_code == 422 and "gadget_spec" in r.text


def test_upload_activate_rollback_delete(admin_server) -> None:
    url = admin_server.url
    before_body, before_state = _snapshot_state(admin_server)
    old = before_state["active"]["cnn-m20"]
    # FLOPs claims are checked, then replaced by the server's measurement. The same tensors re-saved with a
    # metadata note: other bytes, so a new version (identical bytes would answer the stored version, 200).
    data = save_safetensors(_tensors(admin_server), metadata={"copy": "new-version"})
    files = entry_payload(
        entry_of(admin_server, "cnn-m20"), manifest={**_manifest(admin_server), "sha256": sha(data)}, weights=data
    )
    r = httpx.post(f"{url}/v1/admin/models", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["name"] == "cnn-m20" and new["version"] > old and new["active"] is False
    assert _snapshot_state(admin_server) == (before_body, before_state)  # stored, not visible

    r = httpx.post(f"{url}/v1/admin/models/cnn-m20/activate", json={"version": new["version"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["active"]["cnn-m20"] == new["version"]
    stages = [{"variant": "cnn-m20", "samples": 2, "keep": 20}, {"variant": "dense", "samples": 4}]
    q = httpx.post(f"{url}/v1/query", json={**QUERY, "stages": stages}).json()
    assert q["stages"][0]["version"] == new["version"] and q["snapshot_id"] == r.json()["snapshot_id"]
    assert q["snapshot_id"] != before_body["snapshot_id"]

    r = httpx.delete(f"{url}/v1/admin/models/cnn-m20/versions/{new['version']}", headers=AUTH)
    assert r.status_code == 409, r.text  # the active version cannot be deleted

    r = httpx.post(f"{url}/v1/admin/models/cnn-m20/rollback", headers=AUTH)
    assert r.status_code == 200 and r.json()["active"]["cnn-m20"] == old
    assert _snapshot_state(admin_server) == (before_body, before_state)  # back to the very same snapshot

    r = httpx.delete(f"{url}/v1/admin/models/cnn-m20/versions/{new['version']}", headers=AUTH)
    assert r.status_code == 204, r.text
    assert all(
        m["version"] != new["version"] for m in httpx.get(f"{url}/v1/models").json()["models"] if m["name"] == "cnn-m20"
    )
    assert httpx.delete(f"{url}/v1/admin/models/cnn-m20/versions/{new['version']}", headers=AUTH).status_code == 404
    assert httpx.post(f"{url}/v1/admin/models/ghost/activate", headers=AUTH).status_code == 404
    assert httpx.post(f"{url}/v1/admin/models/cnn-m20/activate", json={"version": 999}, headers=AUTH).status_code == 404


def test_put_cascade_validates_against_the_registry(admin_server) -> None:
    url = admin_server.url
    original = httpx.get(f"{url}/v1/cascade").json()
    bad = {"stages": [{"variant": "ghost", "samples": 2, "keep": 20}, {"variant": "dense", "samples": 4}]}
    r = httpx.put(f"{url}/v1/admin/cascade", json=bad, headers=AUTH)
    assert r.status_code == 422 and "ghost" in r.text, r.text
    assert httpx.get(f"{url}/v1/cascade").json() == original
    new = {"stages": [{"variant": "cnn-m20", "samples": 2, "keep": 20}, {"variant": "dense", "samples": 4}]}
    r = httpx.put(f"{url}/v1/admin/cascade", json=new, headers=AUTH)
    assert r.status_code == 200, r.text
    assert [s["variant"] for s in httpx.get(f"{url}/v1/cascade").json()["stages"]] == ["cnn-m20", "dense"]
    assert [s["variant"] for s in httpx.post(f"{url}/v1/query", json=QUERY).json()["stages"]] == ["cnn-m20", "dense"]
    r = httpx.put(f"{url}/v1/admin/cascade", json=original, headers=AUTH)
    assert r.status_code == 200 and httpx.get(f"{url}/v1/cascade").json() == original


def test_push_command_uploads_and_activates(admin_server, tmp_path) -> None:
    """A copy of the cnn-s50 entry with its tensors re-saved (other bytes: a new version)."""
    source = entry_of(admin_server, "cnn-s50")
    entry = tmp_path / "entry"
    entry.mkdir()
    data = save_safetensors(_tensors(admin_server, "cnn-s50"), metadata={"copy": "push"})
    (entry / WEIGHTS_FILE).write_bytes(data)
    manifest = json.loads((source / MANIFEST_FILE).read_text())
    (entry / MANIFEST_FILE).write_text(json.dumps({**manifest, "sha256": sha(data)}))
    with pytest.raises(ValueError, match="401"):
        push(admin_server.url, "wrong", entry)
    out = push(admin_server.url, TOKEN, entry, activate=True)
    assert out["name"] == "cnn-s50" and out["activated"]["active"]["cnn-s50"] == out["version"]
    r = httpx.post(f"{admin_server.url}/v1/admin/models/cnn-s50/rollback", headers=AUTH)
    assert r.status_code == 200 and r.json()["active"]["cnn-s50"] < out["version"]


def _trained_lstm(server, hidden_size: int) -> torch.nn.Module:
    """A briefly trained LSTM gadget for cnn-m20 on the space's items (a random one fails the gadget gate)."""
    from cascade.space import Space
    from lab.tuples import train_gadget
    from models.gadget import GadgetSpec
    from models.gadget_training import GadgetTrainConfig, hidden_of
    from models.registry import ModelRegistry

    model = ModelRegistry(server.home / "registry").load("cnn-m20").model
    space = Space.load(server.home / "spaces" / "default")
    _, hidden = hidden_of(model, space.features)
    labels = torch.from_numpy(space.labels.astype("int64"))
    prior = torch.bincount(labels).double() / len(labels)
    spec = GadgetSpec("lstm", model.spec.hidden_dim, model.spec.num_classes, hidden_size)
    config = GadgetTrainConfig(steps=150, n_max=16, eval_every=50, val_tuples=300)
    return train_gadget(spec, hidden, labels, hidden, labels, prior, config)


def test_upload_with_an_lstm_gadget_serves_the_lstm_aggregator(admin_server) -> None:
    url = admin_server.url
    manifest = _manifest(admin_server)
    spec = NetworkSpec.from_dict(manifest["spec"])
    torch.manual_seed(0)
    gadget = save_safetensors(state_dict_for_saving(_trained_lstm(admin_server, 16)))
    gadget_json = {
        "spec": {"kind": "lstm", "input_dim": spec.hidden_dim, "num_classes": spec.num_classes, "hidden_size": 16}
    }
    files = {**entry_payload(entry_of(admin_server, "cnn-m20")), "gadget": ("gadget.safetensors", gadget)}
    wrong = {**gadget_json, "sha256": "0" * 64}
    r = httpx.post(
        f"{url}/v1/admin/models", files={**files, "gadget_spec": ("gadget.json", json.dumps(wrong))}, headers=AUTH
    )
    assert r.status_code == 422 and "gadget_spec.sha256" in r.text.replace('","', ".")
    r = httpx.post(
        f"{url}/v1/admin/models", files={**files, "gadget_spec": ("gadget.json", json.dumps(gadget_json))}, headers=AUTH
    )
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    stages = [
        {"variant": "cnn-m20", "samples": 2, "keep": 20, "aggregator": "lstm"},
        {"variant": "dense", "samples": 4},
    ]
    assert httpx.post(f"{url}/v1/query", json={**QUERY, "stages": stages}).status_code == 422  # active one has none
    r = httpx.post(f"{url}/v1/admin/models/cnn-m20/activate", json={"version": version}, headers=AUTH)
    assert r.status_code == 200, r.text
    q = httpx.post(f"{url}/v1/query", json={**QUERY, "stages": stages})
    assert q.status_code == 200, q.text
    assert q.json()["stages"][0]["aggregator"] == "lstm" and q.json()["stages"][0]["version"] == version
    assert httpx.post(f"{url}/v1/admin/models/cnn-m20/rollback", headers=AUTH).status_code == 200
    assert httpx.delete(f"{url}/v1/admin/models/cnn-m20/versions/{version}", headers=AUTH).status_code == 204


class _Booby:
    """Unpickling this creates a file: proof that the server never unpickles an upload."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_is_never_unpickled(admin_server) -> None:
    marker = admin_server.home / "unpickled.txt"
    for data in (pickle.dumps(_Booby(str(marker))), _torch_zip_of(_Booby(str(marker)))):
        files = entry_payload(
            entry_of(admin_server, "cnn-m20"), manifest={**_manifest(admin_server), "sha256": sha(data)}, weights=data
        )
        r = httpx.post(f"{admin_server.url}/v1/admin/models", files=files, headers=AUTH)
        assert r.status_code == 415, r.text
    assert not marker.exists()


def _torch_zip_of(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_upload_limit_is_raised_for_uploads_only(admin_server) -> None:
    """1.5 MB: over the 1 MB body limit of other routes, under the upload limit: judged on its content."""
    big = b"\x00" * 1_500_000
    files = entry_payload(entry_of(admin_server, "cnn-m20"), weights=big)
    r = httpx.post(f"{admin_server.url}/v1/admin/models", files=files, headers=AUTH)
    assert r.status_code == 422 and "sha256" in r.text
    r = httpx.post(f"{admin_server.url}/v1/query", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
