"""`prunecascade push`: what it prints must say what holds on the server (an activated upload is active)."""

from __future__ import annotations

import json

import httpx
import pytest
from service_fixtures import AUTH, TOKEN, admin_server, entry_of  # noqa: F401

from service.cli import main


def _push(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["push", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_push_prints_active_as_the_server_has_it(admin_server, capsys: pytest.CaptureFixture[str]) -> None:
    url = admin_server.url
    entry = str(entry_of(admin_server, "cnn-s50"))
    stored = _push(["--url", url, "--token", TOKEN, entry], capsys)
    assert stored["active"] is False and "activated" not in stored  # uploads are stored inactive

    out = _push(["--url", url, "--token", TOKEN, "--activate", entry], capsys)
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
