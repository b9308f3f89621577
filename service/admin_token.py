"""The first run's admin path: `prunecascade serve --bootstrap` (what `make run` does) with no token configured
generates one, once, into `HOME/admin-token` (owner-only, 0600) and prints where it is and how to send it, so a
new user can upload and activate models without a restart. A token set in the environment or a token file
always wins; a home whose token file exists keeps using it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from service.settings import Settings

__all__ = ["HOME_TOKEN_FILE", "first_run_token"]

HOME_TOKEN_FILE = "admin-token"


def _write_private(path: Path, text: str) -> None:
    """Created with mode 0600 from the start (never readable by others, not even briefly); never overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def first_run_token(settings: Settings, generate: bool) -> tuple[Settings, str | None]:
    """Settings that use the home's token file when no other token is configured (creating it when `generate`),
    and a message for the person at the terminal (None when nothing is to be said)."""
    if settings.resolved_admin_token() is not None:
        return settings, None
    path = settings.home / HOME_TOKEN_FILE
    created = False
    if not path.is_file():
        if not generate:
            return settings, None
        try:
            _write_private(path, secrets.token_urlsafe(32))
            created = True
        except FileExistsError:  # another process made it meanwhile: use theirs
            pass
    settings = settings.model_copy(update={"admin_token_file": path})
    if settings.resolved_admin_token() is None:
        return settings, f"admin routes are closed: {path} holds no token"
    usage = f'curl -H "Authorization: Bearer $(cat {path})" http://{settings.host}:{settings.port}/v1/admin/state'
    if created:
        return settings, f"admin token generated into {path} (owner-only). Send it as a bearer token, e.g.\n  {usage}"
    return settings, f"admin token: {path}; e.g.\n  {usage}"
