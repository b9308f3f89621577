"""Hardening, in-process: strict specs and manifests, safetensors detected by parsing, the parameter budget
from the spec, capped validation errors, bayes with impossible classes, a registry listing robust to broken
manifests, and the usable-CPU count from affinity and cgroup files."""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from models.aggregation import MemberOutputs, aggregate, log_prior_of
from models.manifest import Manifest
from models.networks import build_network
from models.registry import MANIFEST_FILE, BrokenEntryError, ModelRegistry
from models.spec import NetworkSpec
from service.checkpoints import UploadError, parse_json, safetensors_header
from service.cpus import cgroup_cpu_limit, usable_cpus
from service.errors import MAX_REPORTED_ERRORS, capped_errors

SPEC = {"kind": "mlp", "input_dim": 8, "num_classes": 3, "hidden": [4]}


# -- specs and JSON that used to escape as KeyError / OverflowError / RecursionError / ValueError --------
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"kind": None}, "kind"),
        ({"input_dim": math.inf}, "input_dim"),
        ({"input_dim": math.nan}, "input_dim"),
        ({"input_dim": 10**5000}, "input_dim"),
        ({"input_dim": "8"}, "input_dim"),
        ({"input_dim": True}, "input_dim"),
        ({"num_classes": 1e7}, "num_classes"),
        ({"hidden": [1e7, 1e7]}, "hidden[0]"),
        ({"hidden": 4}, "hidden"),
        ({"hidden": [4] * 1000}, "hidden"),
        ({"kernel_size": math.inf, "kind": "cnn1d", "channels": [2]}, "kernel_size"),
    ],
)
def test_a_bad_spec_is_a_value_error_naming_the_key(change: dict, needle: str) -> None:
    spec = {k: v for k, v in {**SPEC, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
        NetworkSpec.from_dict(spec)


def test_integral_floats_still_build_a_spec() -> None:
    assert NetworkSpec.from_dict({**SPEC, "input_dim": 8.0}).input_dim == 8


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "deeply"),
        (b'{"x": ' + b"9" * 5000 + b"}", "digits"),
        (b"\xff\xfe", "JSON"),
        (b"{nope", "JSON"),
    ],
)
def test_upload_json_failures_are_422(raw: bytes, needle: str) -> None:
    with pytest.raises(UploadError) as info:
        parse_json(raw, "manifest")
    assert info.value.status == 422 and info.value.field == "manifest" and needle in info.value.message


# -- manifests hold finite numbers only ------------------------------------------------------------------
def _manifest(**changes: object) -> dict:
    base = {
        "name": "m",
        "version": 1,
        "spec": SPEC,
        "flops_dense_kernel": 1,
        "flops_nonzero": 1,
        "accuracy": 0.5,
        "sha256": "0" * 64,
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("output_deviation", math.inf),
        ("output_deviation_p95", math.nan),
        ("keep", math.nan),
        ("flops_nonzero", 2**70),
        ("extra", {"note": math.inf}),
        ("extra", {"deep": [math.nan]}),
        ("extra", {"big": "x" * 70_000}),
    ],
)
def test_manifest_refuses_non_finite_and_unbounded_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        Manifest(**_manifest(**{field: value}))
    assert info.value.errors()[0]["loc"][0] == field


def test_manifest_refuses_infinity_in_stored_json() -> None:
    text = json.dumps(_manifest()).replace('"accuracy": 0.5', '"accuracy": 0.5, "output_deviation": Infinity')
    with pytest.raises(ValidationError):
        Manifest.model_validate_json(text)


def test_registry_lists_broken_manifests_instead_of_failing(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    spec = NetworkSpec.from_dict(SPEC)
    reg.register("m", build_network(spec), accuracy=0.5)
    reg.register("m", build_network(spec), accuracy=0.5, activate=False)
    stored = json.loads((tmp_path / "m" / "2" / MANIFEST_FILE).read_text())
    # what the old server wrote for `"output_deviation": Infinity`: null
    (tmp_path / "m" / "2" / MANIFEST_FILE).write_text(json.dumps({**stored, "output_deviation": None}))
    (tmp_path / "junk" / "1").mkdir(parents=True)
    (tmp_path / "junk" / "1" / MANIFEST_FILE).write_text("{not json")
    (tmp_path / "junk" / "ACTIVE").write_text("garbage")
    listing = {(e["name"], e["version"]): e for e in reg.describe()}
    assert listing[("m", 1)]["active"] is True and "broken" not in listing[("m", 1)]
    assert "output_deviation" in listing[("m", 2)]["broken"]
    assert "broken" in listing[("junk", 1)]
    with pytest.raises(BrokenEntryError, match="output_deviation"):
        reg.manifest("m", 2)
    with pytest.raises(BrokenEntryError):
        reg.load("m", 2)


def test_identical_weights_are_found_per_name(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    m = reg.register("m", build_network(NetworkSpec.from_dict(SPEC)), accuracy=0.5)
    assert reg.find_identical("m", m.sha256, None) == m
    assert reg.find_identical("m", m.sha256, "f" * 64) is None  # with a gadget it is another entry
    assert reg.find_identical("other", m.sha256, None) is None
    assert reg.find_identical("m", "0" * 64, None) is None


# -- safetensors by parsing, every header length modulo 256 ------------------------------------------------
def _safetensors_with_header_length(length: int) -> bytes:
    """A valid safetensors file whose JSON header is exactly `length` bytes (metadata padding)."""
    tensor = torch.arange(6, dtype=torch.float32)
    header = {"t": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}, "__metadata__": {"pad": ""}}
    pad = length - len(json.dumps(header).encode())
    assert pad >= 0
    header["__metadata__"]["pad"] = "x" * pad
    blob = json.dumps(header).encode()
    assert len(blob) == length
    return struct.pack("<Q", length) + blob + tensor.numpy().tobytes()


@pytest.mark.parametrize("residue", range(256))
def test_every_header_length_modulo_256_is_safetensors(residue: int) -> None:
    length = 256 + residue
    raw = _safetensors_with_header_length(length)
    assert len(load_safetensors(raw)) == 1  # the library itself accepts it
    header = safetensors_header(raw)
    assert header is not None and "t" in header


def test_a_128_byte_header_starts_like_a_pickle_and_is_still_safetensors() -> None:
    raw = _safetensors_with_header_length(128)
    assert raw[:1] == b"\x80"  # the byte the old check took for a pickle
    assert safetensors_header(raw) is not None
    saved = save_safetensors({"w": torch.zeros(3)}, metadata={"note": "n" * 61})  # the library pads to 8
    assert safetensors_header(saved) is not None


@pytest.mark.parametrize(
    "raw",
    [
        pickle.dumps({"w": [1.0, 2.0]}),
        pickle.dumps({"w": [1.0, 2.0]}, protocol=5),
        b"PK\x03\x04" + b"\x00" * 64,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 32,
        struct.pack("<Q", 10**9) + b"{}",
        b"",
    ],
)
def test_non_safetensors_bytes_are_not_taken_for_safetensors(raw: bytes) -> None:
    assert safetensors_header(raw) is None


# -- a 422 lists at most MAX_REPORTED_ERRORS errors ---------------------------------------------------------
def test_capped_errors_keep_the_first_and_count_the_rest() -> None:
    errors = [{"loc": ("body", "x", i), "msg": "bad", "type": "float_type", "input": math.nan} for i in range(1000)]
    out = capped_errors(errors)
    assert len(out) == MAX_REPORTED_ERRORS + 1
    assert out[0]["loc"] == ["body", "x", 0] and "input" not in out[0]
    assert out[-1]["type"] == "too_many_errors" and str(1000 - MAX_REPORTED_ERRORS) in out[-1]["msg"]
    expected = [{"loc": ["body", "x", i], "msg": "bad", "type": "float_type"} for i in range(3)]
    assert capped_errors(errors[:3]) == expected


# -- bayes gives no mass to classes the space cannot hold ----------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_bayes_gives_impossible_classes_no_mass(n: int) -> None:
    """Labels {2, 7, 9} only: the prior is 0 elsewhere. Members that weakly favour class 8 (impossible) and
    mostly favour 2 must give 8 nothing and 2 the most."""
    prior = torch.zeros(10)
    prior[[2, 7, 9]] = torch.tensor([0.5, 0.3, 0.2])
    logits = torch.zeros(n, 10)
    logits[:, 2] = 2.0
    logits[:, 8] = 1.5
    log_post = aggregate("bayes", MemberOutputs(logits), torch.tensor([n]), log_prior_of(prior))
    post = log_post.double().exp()[0]
    impossible = [c for c in range(10) if c not in (2, 7, 9)]
    assert float(post[impossible].sum()) == 0.0
    assert int(post.argmax()) == 2
    assert math.isclose(float(post.sum()), 1.0, rel_tol=1e-6)


def test_bayes_is_unchanged_when_every_class_is_possible() -> None:
    prior = torch.full((4,), 0.25)
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([2, 4])
    got = aggregate("bayes", MemberOutputs(logits), counts, log_prior_of(prior))
    expected = torch.stack([logits[:2].log_softmax(1).sum(0), logits[2:].log_softmax(1).sum(0)])
    expected -= (counts[:, None] - 1) * prior.log()[None, :]
    torch.testing.assert_close(got, expected.log_softmax(1), atol=1e-5, rtol=0)


# -- CPUs this process may use ----------------------------------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_limit_parsing(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    assert cgroup_cpu_limit(_write(tmp_path, files)) == expected


def test_usable_cpus_is_capped_by_the_quota_not_the_host(tmp_path: Path) -> None:
    import os

    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(_write(tmp_path / "a", {"cpu.max": "max 100000"})) == affinity
    assert usable_cpus(_write(tmp_path / "b", {"cpu.max": "50000 100000"})) == 1  # half a CPU: ceil to 1
    assert usable_cpus(_write(tmp_path / "c", {"cpu.max": f"{100000 * (affinity + 8)} 100000"})) == affinity


def test_torch_threads_default_comes_from_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.settings as settings_module

    monkeypatch.setattr(settings_module, "usable_cpus", lambda: 8)
    monkeypatch.delenv("PRUNECASCADE_TORCH_THREADS", raising=False)
    assert settings_module.Settings(max_concurrent_queries=2).torch_threads == 4
    assert settings_module.Settings(max_concurrent_queries=16).torch_threads == 1
    assert settings_module.Settings(torch_threads=3).torch_threads == 3


def test_admin_token_whitespace_is_stripped(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    monkeypatch.setenv("PRUNECASCADE_ADMIN_TOKEN", "  secret-token\n")
    s = Settings()
    assert s.resolved_admin_token() == "secret-token" and s.token_was_stripped()
    monkeypatch.setenv("PRUNECASCADE_ADMIN_TOKEN", "secret-token")
    assert not Settings().token_was_stripped()
    monkeypatch.setenv("PRUNECASCADE_ADMIN_TOKEN", "   ")
    assert Settings().resolved_admin_token() is None
