"""The model registry: round trips, checksums, versions, activation, and no unpickling."""

from __future__ import annotations

import json

import pytest
import torch

from models.manifest import Manifest
from models.networks import build_network
from models.registry import MANIFEST_FILE, WEIGHTS_FILE, ModelRegistry, RegistryError
from models.spec import NetworkSpec

SPEC = NetworkSpec("cnn1d", 40, 10, hidden=(16,), channels=(4, 8))


def test_register_load_round_trip(tmp_path) -> None:
    reg = ModelRegistry(tmp_path)
    net = build_network(SPEC).eval()
    m = reg.register("tiny", net, accuracy=0.5, dataset="mnist1d")
    assert (m.name, m.version, m.parent) == ("tiny", 1, None)
    assert m.flops_dense_kernel > 0 and m.flops_nonzero == m.flops_dense_kernel
    loaded = reg.load("tiny")
    x = torch.randn(3, 40)
    torch.testing.assert_close(loaded.model(x), net(x))
    assert loaded.manifest == m
    # every key the foundation issue names is in the manifest file
    keys = json.loads((tmp_path / "tiny" / "1" / MANIFEST_FILE).read_text()).keys()
    for key in (
        "name",
        "version",
        "spec",
        "parent",
        "method",
        "keep",
        "flops_dense_kernel",
        "flops_nonzero",
        "accuracy",
        "output_deviation",
        "sha256",
        "created_at",
    ):
        assert key in keys


def test_versions_activation_and_delete(tmp_path) -> None:
    reg = ModelRegistry(tmp_path)
    net = build_network(SPEC)
    reg.register("m", net, accuracy=0.1)
    reg.register("m", net, accuracy=0.2, activate=False)
    assert reg.versions("m") == [1, 2] and reg.active_version("m") == 1
    reg.activate("m", 2)
    assert reg.manifest("m").accuracy == 0.2
    with pytest.raises(ValueError, match="active"):
        reg.delete("m", 2)
    reg.delete("m", 1)
    assert reg.versions("m") == [2]
    with pytest.raises(RegistryError, match="no version 7"):
        reg.activate("m", 7)
    with pytest.raises(RegistryError, match="unknown model"):
        reg.load("nope")
    with pytest.raises(ValueError, match="invalid model name"):
        reg.register("Bad Name", net, accuracy=0.1)


def test_tampered_weights_are_refused(tmp_path) -> None:
    reg = ModelRegistry(tmp_path)
    reg.register("m", build_network(SPEC), accuracy=0.1)
    weights = tmp_path / "m" / "1" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="sha256"):
        reg.load("m")


def test_a_pickle_is_never_loaded(tmp_path) -> None:
    reg = ModelRegistry(tmp_path)
    reg.register("m", build_network(SPEC), accuracy=0.1)
    weights = tmp_path / "m" / "1" / WEIGHTS_FILE
    torch.save(build_network(SPEC).state_dict(), weights)  # a pickle where safetensors belongs
    manifest = Manifest.model_validate_json((tmp_path / "m" / "1" / MANIFEST_FILE).read_text())
    from models.registry import sha256_file

    fixed = manifest.model_copy(update={"sha256": sha256_file(weights)})
    (tmp_path / "m" / "1" / MANIFEST_FILE).write_text(fixed.model_dump_json())
    with pytest.raises(Exception) as info:
        reg.load("m")
    assert "pickle" not in type(info.value).__name__.lower()  # safetensors refuses the header; nothing unpickled
