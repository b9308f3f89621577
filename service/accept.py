"""Spreading connections over worker processes (`prunecascade serve --workers N`).

uvicorn's workers share one listening socket, and asyncio accepts every pending connection at each wakeup (up to
the backlog): the worker that wakes first takes a whole burst. Measured with `benchmarks/bench_accept.py` (2
workers, connections opened at once as the load tester's clients open them; docs/performance.md 0b): with
uvicorn's own loop, 2 connections landed on one worker in 9 of 10 tries and 8 connections split 8/0 in 4 of 10
and 7/1 in 3; with this loop, 1/1 in 10 of 10 and 4/4, 5/3 or 6/2 (6, 3 and 1 of 10).

`BalancedAcceptLoop` (uvicorn's `--loop service.accept:BalancedAcceptLoop`, set by `prunecascade serve` with several
workers) accepts one connection per wakeup and then stops listening for `ACCEPT_DELAY_PER_CONNECTION_S` per
connection it holds, the new one included (at most `ACCEPT_DELAY_MAX_S`): the next connections of a burst go to
a worker that holds fewer, as nginx's `accept_mutex` backs off a loaded worker, without shared state between the
workers (a worker busy computing runs its timer later still, leaving more to an idle one). A new connection waits
for a worker at most that long; a keep-alive connection pays it once.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["BalancedAcceptLoop", "ACCEPT_DELAY_PER_CONNECTION_S", "ACCEPT_DELAY_MAX_S"]

ACCEPT_DELAY_PER_CONNECTION_S = 0.002
ACCEPT_DELAY_MAX_S = 0.01


def _connections(server: Any) -> int:
    """Connections this process holds on `server` (asyncio's count of its transports; 0 when unknown)."""
    count = getattr(server, "_active_count", None)
    if count is None:  # newer Pythons keep the transports in a set
        count = len(getattr(server, "_clients", None) or ())
    return int(count)


class BalancedAcceptLoop(asyncio.SelectorEventLoop):
    """An asyncio selector loop whose listening sockets accept one connection per wakeup and then stop listening
    for a while that grows with the connections this process holds (see the module)."""

    def _accept_connection(  # type: ignore[override]
        self, protocol_factory: Any, sock: Any, sslcontext: Any = None, server: Any = None, backlog: int = 100, *rest
    ) -> None:
        held = _connections(server)
        try:
            conn, addr = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it
        except OSError:  # out of file descriptors or memory: asyncio's own handling (it retries later)
            super()._accept_connection(protocol_factory, sock, sslcontext, server, backlog, *rest)
            return
        conn.setblocking(False)
        extra = {"peername": addr}
        self.create_task(self._accept_connection2(protocol_factory, conn, extra, sslcontext, server, *rest))
        # the next pending connections go to a worker that holds fewer, unless none takes them meanwhile
        self._remove_reader(sock.fileno())
        delay = min((held + 1) * ACCEPT_DELAY_PER_CONNECTION_S, ACCEPT_DELAY_MAX_S)
        self.call_later(delay, self._listen_again, (protocol_factory, sock, sslcontext, server, backlog, *rest))

    def _listen_again(self, args: tuple) -> None:
        sock, server = args[1], args[3]
        if sock.fileno() < 0 or (server is not None and not server.is_serving()):
            return  # the server closed meanwhile
        self._start_serving(*args)  # registers the reader again (and accepts at once if a connection waits)
