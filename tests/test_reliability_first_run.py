"""The first run leaves a usable admin path (a token generated once into the home, owner-only, printed with how
to send it), and a stage that names a gadget stored on disk but not loaded says to reload."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import torch
from conftest import start_server, stop_server
from service_fixtures import QUERY, copy_home

from models.gadget import GadgetSpec, build_gadget
from models.registry import ModelRegistry
from service.admin_token import HOME_TOKEN_FILE, first_run_token
from service.settings import Settings


def test_the_first_run_generates_a_private_token_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("PRUNECASCADE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("PRUNECASCADE_ADMIN_TOKEN_FILE", raising=False)
    settings = Settings(home=tmp_path / "home")
    assert settings.resolved_admin_token() is None
    unchanged, note = first_run_token(settings, generate=False)  # a plain `serve` generates nothing
    assert unchanged.resolved_admin_token() is None and note is None
    assert not (tmp_path / "home" / HOME_TOKEN_FILE).exists()

    first, note = first_run_token(settings, generate=True)
    path = tmp_path / "home" / HOME_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = first.resolved_admin_token()
    assert token and len(token) >= 32
    assert note is not None and str(path) in note and "Authorization: Bearer" in note and "generated" in note
    again, note = first_run_token(settings, generate=True)
    assert again.resolved_admin_token() == token and note is not None and "generated" not in note
    configured = Settings(home=tmp_path / "home", admin_token="set-by-the-operator")
    kept, note = first_run_token(configured, generate=True)
    assert kept.resolved_admin_token() == "set-by-the-operator" and note is None


def test_a_served_home_with_a_token_file_opens_admin(tiny_home: Path, tmp_path: Path) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    settings, _ = first_run_token(Settings(home=home), generate=True)
    token = settings.resolved_admin_token()
    server = start_server(home)  # plain `serve`: uses the home's token file
    try:
        r = httpx.get(f"{server.url}/v1/admin/state", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert httpx.get(f"{server.url}/v1/admin/state").status_code == 401
    finally:
        stop_server(server)


def test_a_gadget_stored_but_not_loaded_says_reload(tiny_home: Path, tmp_path: Path) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    token = first_run_token(Settings(home=home), generate=True)[0].resolved_admin_token()
    server = start_server(home)
    try:
        registry = ModelRegistry(home / "registry")
        spec = registry.manifest("cnn-m20").network_spec
        torch.manual_seed(0)
        gadget = build_gadget(GadgetSpec("lstm", spec.hidden_dim, spec.num_classes, 8))
        registry.save_gadget("cnn-m20", registry.active_version("cnn-m20"), gadget)  # as `prunecascade gadget` does
        stages = [
            {"variant": "cnn-m20", "samples": 2, "keep": 20, "aggregator": "lstm"},
            {"variant": "dense", "samples": 4},
        ]
        r = httpx.post(f"{server.url}/v1/query", json={**QUERY, "stages": stages})
        assert r.status_code == 422, r.text
        msg = r.json()["detail"][0]["msg"]
        assert "stored but not loaded" in msg and "reload" in msg, msg
        r = httpx.post(f"{server.url}/v1/admin/reload", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert httpx.post(f"{server.url}/v1/query", json={**QUERY, "stages": stages}).status_code == 200
    finally:
        stop_server(server)
