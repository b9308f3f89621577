"""`prunecascade push`: what it prints must say what holds on the server (an activated upload is active)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load, save
from service_fixtures import AUTH, TOKEN, admin_server, entry_of  # noqa: F401

from models.registry import MANIFEST_FILE, WEIGHTS_FILE
from service.cli import main


def _push(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["push", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _new_bytes_copy(entry: Path, into: Path) -> str:
    """The entry's tensors re-saved with a metadata note: other bytes, so the server stores a new version (the
    very same bytes would answer the version already stored)."""
    shutil.copytree(entry, into)
    data = save(load((into / WEIGHTS_FILE).read_bytes()), metadata={"note": into.name})
    (into / WEIGHTS_FILE).write_bytes(data)
    manifest = json.loads((into / MANIFEST_FILE).read_text())
    (into / MANIFEST_FILE).write_text(json.dumps({**manifest, "sha256": hashlib.sha256(data).hexdigest()}))
    return str(into)


def test_push_prints_active_as_the_server_has_it(
    admin_server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = admin_server.url
    entry = _new_bytes_copy(entry_of(admin_server, "cnn-s50"), tmp_path / "entry")
    stored = _push(["--url", url, "--token", TOKEN, entry], capsys)
    assert stored["active"] is False and "activated" not in stored  # uploads are stored inactive

    again = _new_bytes_copy(entry_of(admin_server, "cnn-s50"), tmp_path / "again")
    out = _push(["--url", url, "--token", TOKEN, "--activate", again], capsys)
    assert out["active"] is True
    assert out["version"] > stored["version"]
    state = httpx.get(f"{url}/v1/models").json()["models"]
    assert any(m["name"] == "cnn-s50" and m["version"] == out["version"] and m["active"] for m in state)
    r = httpx.post(f"{url}/v1/admin/models/cnn-s50/rollback", headers=AUTH)  # leave the shared server as it was
    assert r.status_code == 200


def test_push_without_a_token_names_the_fix(admin_server, capsys, monkeypatch) -> None:
    monkeypatch.delenv("PRUNECASCADE_ADMIN_TOKEN", raising=False)
    assert main(["push", "--url", admin_server.url, str(entry_of(admin_server, "cnn-s50"))]) == 2
    assert "pass --token or set PRUNECASCADE_ADMIN_TOKEN" in capsys.readouterr().err
