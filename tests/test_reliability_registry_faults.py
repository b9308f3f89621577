"""A broken registry entry never keeps a replica from serving: on restart over each fault class (truncated weights,
a missing version in ACTIVE, a broken manifest) the server becomes ready and answers, and the fault is visible in
/v1/models, the log and a metric. Where a default cascade needs the broken model, the server serves its previous
good version, else a shorter cascade, and says so in the answers."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Server, start_server
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import QUERY, copy_home

from models.registry import MANIFEST_FILE, WEIGHTS_FILE


def _truncate(entry: Path) -> None:
    weights = entry / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _missing_active(entry: Path) -> None:
    (entry.parent / "ACTIVE").write_text("7\n")


def _broken_manifest(entry: Path) -> None:
    (entry / MANIFEST_FILE).write_text('{"name": ')


FAULTS: dict[str, Callable[[Path], None]] = {
    "truncated weights": _truncate,
    "missing version in ACTIVE": _missing_active,
    "broken manifest": _broken_manifest,
}


def _broken_metric(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.labels["name"], s.labels["version"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "prunecascade_registry_broken"
    }


def _stop(server: Server) -> str:
    """Stops the server; returns what it logged."""
    server.process.terminate()
    try:
        _, err = server.process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        _, err = server.process.communicate()
    return err.decode(errors="replace")


def _second_version(home: Path, name: str) -> Path:
    """Version 2 of `name`, a copy of version 1, made active (so version 1 is its previous good version)."""
    d = home / "registry" / name
    shutil.copytree(d / "1", d / "2")
    manifest = json.loads((d / "2" / MANIFEST_FILE).read_text())
    (d / "2" / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 2}))
    (d / "ACTIVE").write_text("2\n")
    (d / "HISTORY").write_text("[1, 2]")
    return d / "2"


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_broken_model_no_cascade_uses_is_reported_and_the_rest_served(
    fault: str, tiny_home: Path, tmp_path: Path
) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    FAULTS[fault](home / "registry" / "cnn-m20" / "1")  # in the registry, in no default cascade
    server = start_server(home, {"PRUNECASCADE_LOG_LEVEL": "info"})
    try:
        r = httpx.post(f"{server.url}/v1/query", json=QUERY, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json().get("warnings", []) == []  # the default cascade is whole
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        faults = [b for b in models["broken"] if b["name"] == "cnn-m20"]
        assert len(faults) == 1, models["broken"]
        # an ACTIVE naming a missing version falls back to the stored one; a broken version 1 has nothing to fall to
        assert faults[0]["served_version"] == (1 if fault == "missing version in ACTIVE" else None)
        assert _broken_metric(server.url).get(("cnn-m20", str(faults[0]["version"] or "unknown"))) == 1
        served = {(m["name"], m["version"]) for m in models["models"] if m.get("served")}
        assert ("cnn-s50", 1) in served and ("dense", 1) in served
        assert (("cnn-m20", 1) in served) == (fault == "missing version in ACTIVE")
    finally:
        log = _stop(server)
    assert "cnn-m20" in log and "broken" in log, log[-2000:]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_broken_cascade_model_falls_back_to_its_previous_good_version(
    fault: str, tiny_home: Path, tmp_path: Path
) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    FAULTS[fault](_second_version(home, "cnn-s50"))
    good = 2 if fault == "missing version in ACTIVE" else 1  # ACTIVE=7: version 2 was the last one activated
    server = start_server(home)
    try:
        r = httpx.post(f"{server.url}/v1/query", json=QUERY, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert ("cnn-s50", good) in {(s["variant"], s["version"]) for s in body["stages"]}
        assert any("cnn-s50" in w and f"version {good}" in w for w in body["warnings"]), body["warnings"]
        broken = httpx.get(f"{server.url}/v1/models", timeout=10).json()["broken"]
        assert [(b["name"], b["served_version"]) for b in broken] == [("cnn-s50", good)]
    finally:
        _stop(server)


def test_a_broken_cascade_model_without_a_good_version_shortens_the_cascade(tiny_home: Path, tmp_path: Path) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    _truncate(home / "registry" / "cnn-s50" / "1")
    _truncate(home / "registry" / "pair-s25" / "1")
    server = start_server(home)
    try:
        r = httpx.post(f"{server.url}/v1/query", json=QUERY, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [s["variant"] for s in body["stages"]] == ["dense"]
        assert any("cnn-s50" in w for w in body["warnings"]), body["warnings"]
        example = httpx.get(f"{server.url}/v1/space/queries", params={"limit": 1}, timeout=10).json()["queries"][0]
        r = httpx.post(f"{server.url}/v1/query", json={"target": {"examples": [example["x"]]}, "k": 5}, timeout=30)
        assert r.status_code == 200, r.text
        assert "pair-s25" not in [s["variant"] for s in r.json()["stages"]]
        assert any("pair-s25" in w for w in r.json()["warnings"]), r.json()["warnings"]
        # a label answered exactly does not depend on the cascade: no warning about it
        exact = httpx.post(f"{server.url}/v1/query", json={"target": {"label": 1}, "k": 3, "mode": "exact"}, timeout=30)
        assert exact.status_code in (200, 503)  # 503 while its table builds
        if exact.status_code == 200:
            assert exact.json()["warnings"] == []
        metric = _broken_metric(server.url)
        assert metric.get(("cnn-s50", "1")) == 1 and metric.get(("pair-s25", "1")) == 1
    finally:
        _stop(server)
