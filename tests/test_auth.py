"""The auth matrix of the admin routes: no token configured → 403 whatever is sent; configured → 401 for a
missing, wrong or non-bearer credential, and through for the right one."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from service_fixtures import TOKEN, admin_server  # noqa: F401

from service.settings import Settings

ROUTES = [
    ("POST", "/v1/admin/models", {"files": {"manifest": ("m.json", b"{}"), "weights": ("w", b"x")}}),
    ("POST", "/v1/admin/models/dense/activate", {}),
    ("POST", "/v1/admin/models/dense/rollback", {}),
    ("DELETE", "/v1/admin/models/dense/versions/999", {}),
    ("PUT", "/v1/admin/cascade", {"json": {"stages": [{"variant": "dense", "samples": 2}]}}),
    ("GET", "/v1/admin/state", {}),
]
CREDENTIALS = {
    "none": {},
    "wrong": {"Authorization": "Bearer not-the-token"},
    "prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "basic": {"Authorization": f"Basic {TOKEN}"},
    "empty": {"Authorization": "Bearer"},
    "right": {"Authorization": f"Bearer {TOKEN}"},
}
IDS = [f"{m} {p}" for m, p, _ in ROUTES]


@pytest.mark.parametrize(("method", "path", "kw"), ROUTES, ids=IDS)
@pytest.mark.parametrize("cred", list(CREDENTIALS))
def test_no_token_configured_means_closed(server, method, path, kw, cred) -> None:
    r = httpx.request(method, f"{server.url}{path}", headers=CREDENTIALS[cred], **kw)
    assert r.status_code == 403, r.text


@pytest.mark.parametrize(("method", "path", "kw"), ROUTES, ids=IDS)
@pytest.mark.parametrize("cred", ["none", "wrong", "prefix", "basic", "empty"])
def test_missing_or_wrong_token_is_401(admin_server, method, path, kw, cred) -> None:
    r = httpx.request(method, f"{admin_server.url}{path}", headers=CREDENTIALS[cred], **kw)
    assert r.status_code == 401, r.text
    assert r.headers.get("www-authenticate") == "Bearer"


@pytest.mark.parametrize(("method", "path", "kw"), ROUTES, ids=IDS)
def test_right_token_gets_through(admin_server, method, path, kw) -> None:
    """Past auth, each of these requests is refused on its merits (or, for GET state, answered)."""
    r = httpx.request(method, f"{admin_server.url}{path}", headers=CREDENTIALS["right"], **kw)
    assert r.status_code not in (401, 403), r.text
    assert r.status_code < 500


def test_public_routes_need_no_token(admin_server) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/v1/cascade", "/v1/space"):
        assert httpx.get(f"{admin_server.url}{path}").status_code == 200, path


def test_token_from_env_wins_then_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("  from-file\n")
    assert Settings(home=tmp_path, admin_token_file=f).resolved_admin_token() == "from-file"
    assert Settings(home=tmp_path, admin_token=SecretStr("env"), admin_token_file=f).resolved_admin_token() == "env"
    assert Settings(home=tmp_path, admin_token=SecretStr("")).resolved_admin_token() is None
    assert Settings(home=tmp_path, admin_token_file=tmp_path / "missing").resolved_admin_token() is None
    f.write_text("\n")
    assert Settings(home=tmp_path, admin_token_file=f).resolved_admin_token() is None
