"""uvicorn's HTTP/1.1 protocol with a request-head timeout. uvicorn closes idle keep-alive connections only
after a response, so a connection that never sends a complete request head (idle from the start, or dripping
header bytes) would otherwise stay open for ever: 1,000 of them were held in a review. Here each connection
must deliver a complete request head within `head_timeout_s` of opening or of its previous response."""

from __future__ import annotations

import asyncio
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HeadTimeoutH11Protocol", "with_head_timeout", "EnvHeadTimeoutH11Protocol"]


class HeadTimeoutH11Protocol(H11Protocol):
    head_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # IDLE: no complete request head has arrived since the timer was armed (a request being received or
        # answered has moved the peer past IDLE, and re-arms the timer when its response completes).
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def with_head_timeout(seconds: float) -> type[HeadTimeoutH11Protocol]:
    """The protocol class to pass as uvicorn's `http=`, with this timeout."""
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"head_timeout_s": seconds})


class EnvHeadTimeoutH11Protocol(HeadTimeoutH11Protocol):
    """The same, with the timeout read from `PRUNECASCADE_HEADER_TIMEOUT_S` when the module is imported: a
    class defined at module level, so uvicorn can hand it to worker processes (`prunecascade serve` with
    several workers), which a class made by `with_head_timeout` cannot cross."""

    head_timeout_s = float(os.environ.get("PRUNECASCADE_HEADER_TIMEOUT_S", "10"))
