"""`/docs` and `/redoc` work offline: every asset the pages reference is a local URL that the real server
serves with the right content type (FastAPI's defaults load them from a CDN: a blank page offline)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import Server

from service.docs_ui import ASSETS_PATH, assets_dir

ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


def _referenced(html: str) -> list[str]:
    """Every src= and href= in the page, and every absolute http(s) URL anywhere in it."""
    attrs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    return attrs + re.findall(r"""https?://[^\s"'<>)]+""", html)


@pytest.mark.parametrize(("page", "assets"), [("/docs", 3), ("/redoc", 2)])
def test_docs_pages_reference_only_local_assets_that_are_served(server: Server, page: str, assets: int) -> None:
    r = httpx.get(f"{server.url}{page}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = _referenced(r.text)
    assert len(urls) >= assets, urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"{page} loads {url} from another host"
        assert url.startswith(ASSETS_PATH + "/"), url
        got = httpx.get(f"{server.url}{url}")
        assert got.status_code == 200, url
        kind = ASSET_TYPES[url[url.rindex(".") :]]
        assert kind in got.headers["content-type"], (url, got.headers["content-type"])
        assert got.content == (assets_dir() / url.rsplit("/", 1)[1]).read_bytes()


def test_swagger_ui_is_the_real_bundle_and_points_at_this_servers_spec(server: Server) -> None:
    html = httpx.get(f"{server.url}/docs").text
    assert "url: '/openapi.json'" in html and '"validatorUrl": null' in html
    bundle = httpx.get(f"{server.url}{ASSETS_PATH}/swagger-ui-bundle.js").text
    assert len(bundle) > 500_000 and "SwaggerUIBundle" in bundle
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/query" in spec["paths"]
    assert not any(p.startswith(("/docs", ASSETS_PATH)) for p in spec["paths"])  # the pages are not API routes


def test_an_unknown_asset_is_a_404(server: Server) -> None:
    assert httpx.get(f"{server.url}{ASSETS_PATH}/nothing.js").status_code == 404
