"""`prunecascade push --url URL --token TOKEN ENTRY_DIR [--activate]`: upload a registry entry directory
(manifest.json, weights.safetensors, optional gadget.safetensors + gadget.json) to a running service."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["register", "push"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a registry entry to a running service (admin token)")
    p.add_argument("entry_dir", type=Path, help="directory holding manifest.json and weights.safetensors")
    p.add_argument("--url", required=True, help="base URL of the service, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", help="admin token (default: $PRUNECASCADE_ADMIN_TOKEN)")
    p.add_argument("--activate", action="store_true", help="activate the new version once stored")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.set_defaults(func=run)


def push(url: str, token: str, entry_dir: Path, activate: bool = False, timeout: float = 120.0) -> dict[str, Any]:
    """Returns the upload answer; when asked to activate, `active` is true once the service reports this
    version as the active one, and `activated` holds the admin state it answered."""
    import httpx

    from models.registry import GADGET_SPEC_FILE, GADGET_WEIGHTS_FILE, MANIFEST_FILE, WEIGHTS_FILE

    files = {}
    for field, fname in (
        ("manifest", MANIFEST_FILE),
        ("weights", WEIGHTS_FILE),
        ("gadget", GADGET_WEIGHTS_FILE),
        ("gadget_spec", GADGET_SPEC_FILE),
    ):
        path = entry_dir / fname
        if path.is_file():
            files[field] = (fname, path.read_bytes(), "application/octet-stream")
        elif field in ("manifest", "weights"):
            raise ValueError(f"{entry_dir} has no {fname}")
    headers = {"Authorization": f"Bearer {token}"}
    base = url.rstrip("/")
    with httpx.Client(timeout=timeout, headers=headers) as client:
        r = client.post(f"{base}/v1/admin/models", files=files)
        if r.status_code not in (200, 201):  # 200: identical bytes were stored before, that version is answered
            raise ValueError(f"upload refused ({r.status_code}): {r.text}")
        out = r.json()
        if activate:
            a = client.post(f"{base}/v1/admin/models/{out['name']}/activate", json={"version": out["version"]})
            if a.status_code != 200:
                raise ValueError(
                    f"stored as {out['name']}:{out['version']} but activation failed ({a.status_code}): {a.text}"
                )
            out["activated"] = a.json()
            # the upload answer said `active: false` (uploads are stored inactive); say what holds now
            out["active"] = out["activated"].get("active", {}).get(out["name"]) == out["version"]
    return out


def run(args: argparse.Namespace) -> int:
    import httpx

    token = args.token or os.environ.get("PRUNECASCADE_ADMIN_TOKEN")
    if not token:
        raise ValueError("no admin token: pass --token or set PRUNECASCADE_ADMIN_TOKEN")
    try:
        out = push(args.url, token, args.entry_dir, args.activate, args.timeout)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach {args.url}: {exc}") from None
    print(json.dumps(out, indent=2))
    return 0
