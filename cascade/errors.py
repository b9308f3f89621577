"""Errors a query raises before or while it is answered, free of any transport: the service maps them to
HTTP statuses (service/errors.py), a command prints them."""

from __future__ import annotations

__all__ = ["RequestError", "ExactTableNotReady"]


class RequestError(ValueError):
    """A request that cannot be answered on this snapshot: a field out of range, an unknown label, a stage list
    that cannot run. `field` names the offending part (`k`, `target.label`, `stages[1].keep`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ExactTableNotReady(RuntimeError):
    """`mode: exact` while the exact table of this snapshot's dense model is still being built: ask again."""
