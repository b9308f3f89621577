"""Where a load test may point: loopback only unless the operator says otherwise, so a typo in --url cannot
turn the tool against someone else's server."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["is_loopback_url", "check_target"]


def is_loopback_url(url: str) -> bool:
    """True for http(s) URLs whose host is `localhost` or a loopback IP literal; names are not resolved."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_target(url: str, allow_remote: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url must be an http(s) URL with a host, got {url!r}")
    if not allow_remote and not is_loopback_url(url):
        raise ValueError(f"refusing to load {parts.hostname}: not loopback (pass --allow-remote to target it)")
