"""Bounded cost and fair sharing of the query route: at most `concurrency` queries computed at once, at most
`queue` more waiting (beyond: 503 with Retry-After at once), and a server-side deadline on each, queueing
included (504 when it passes). Pure ASGI, around the route, so it needs nothing from the route itself.

Nothing a client can hold open for free occupies query capacity: the whole body is read (at most `max_body_bytes`,
within `body_timeout_s`: 413 or 408 beyond) before the request may take a slot or a queue place, and the answer
is handed to the client after the slot is given back, so neither a body sent one byte at a time nor a client
that never reads its answer keeps a query slot.

A query past its deadline is answered 504 at once; the engine checks the deadline between stages and stops, but
a stage already running (a worker thread, which Python cannot interrupt) runs to its end and keeps its slot
until then: the slots bound the CPU really in use, and the per-query cost budget bounds how long that takes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import field_error
from service.metrics import Metrics

__all__ = ["QueryLimiter", "BodySizeLimit", "BodyTimeout"]

log = logging.getLogger("prunecascade.limits")


def _error(status: int, msg: str, kind: str, headers: list[tuple[bytes, bytes]]) -> tuple[Message, Message]:
    body = json.dumps({"detail": [{"loc": [], "msg": msg, "type": kind}]}).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *headers],
    }
    return start, {"type": "http.response.body", "body": body}


class QueryLimiter:
    def __init__(
        self,
        app: ASGIApp,
        *,
        paths: tuple[str, ...],
        concurrency: int,
        queue: int,
        timeout_s: float,
        retry_after_s: int,
        metrics: Metrics,
        max_body_bytes: int,
        body_timeout_s: float,
        heavy: Callable[[bytes], bool] | None = None,
        reserved_slots: int = 0,
        on_admit: Callable[[bytes], Any] | None = None,
    ) -> None:
        """`heavy(body)`: whether a query is heavy; heavy queries hold at most `concurrency - reserved_slots`
        slots at once (at least one), so the reserved ones stay free for the others. `on_admit(body)`: called
        when a query takes its slot; what it returns is handed to the route (`request.state.admitted`) and
        cancelled (`.cancel()`) when the query is done (the batcher counts admitted queries on their way)."""
        self.app = app
        self.paths = frozenset(paths)
        self.concurrency = concurrency
        self.queue = queue
        self.timeout_s = timeout_s
        self.retry_after = str(retry_after_s).encode()
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.heavy = heavy
        self.on_admit = on_admit
        self.heavy_concurrency = max(1, concurrency - reserved_slots)
        self._slots: asyncio.Semaphore | None = None  # created on the server's event loop
        self._heavy_slots: asyncio.Semaphore | None = None
        self._waiting = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        body = await self._read_body(receive, send)
        if body is None:
            return  # answered (408, 413) or the client went away: it never took a slot nor a queue place
        receive = _replay(body, receive)
        raw = b"".join(m.get("body", b"") for m in body)
        heavy = self.heavy is not None and self.heavy(raw)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
            self._heavy_slots = asyncio.Semaphore(self.heavy_concurrency)
        slots, heavy_slots = self._slots, self._heavy_slots
        assert heavy_slots is not None
        started = time.monotonic()
        free = not slots.locked() and not (heavy and heavy_slots.locked())
        if not free and self._waiting >= self.queue:
            self.metrics.query_rejected.labels(reason="queue_full").inc()
            await self._send_error(
                send,
                503,
                f"too many queries: {self.concurrency} running and {self.queue} queued; retry later",
                "overloaded",
                [(b"retry-after", self.retry_after)],
            )
            return
        if free:
            await self._acquire(heavy)  # free slots: taken at once, without a timer
        else:
            self._waiting += 1
            self.metrics.query_queued.inc()
            try:
                await asyncio.wait_for(self._acquire(heavy), self.timeout_s)
            except TimeoutError:
                self.metrics.query_rejected.labels(reason="deadline").inc()
                await self._send_error(
                    send, 504, f"deadline of {self.timeout_s:g} s passed while queued", "timeout", []
                )
                return
            finally:
                self._waiting -= 1
                self.metrics.query_queued.dec()
        self.metrics.query_queue_seconds.observe(time.monotonic() - started)
        self.metrics.query_inflight.inc()
        # the route reads it (`request.state.deadline`) and the engine stops between stages once it passes, so a
        # query answered 504 gives its slot back instead of computing to the end
        scope.setdefault("state", {})["deadline"] = started + self.timeout_s
        admitted = self.on_admit(raw) if self.on_admit is not None else None
        scope["state"]["admitted"] = admitted
        try:
            await self._run(scope, receive, send, heavy, started + self.timeout_s - time.monotonic())
        finally:
            if admitted is not None:
                admitted.cancel()

    async def _acquire(self, heavy: bool) -> None:
        """A slot, and for a heavy query one of the slots heavy queries may hold (taken first, given back if the
        wait is cancelled)."""
        assert self._slots is not None and self._heavy_slots is not None
        if not heavy:
            await self._slots.acquire()
            return
        await self._heavy_slots.acquire()
        try:
            await self._slots.acquire()
        except BaseException:
            self._heavy_slots.release()
            raise
        self.metrics.query_inflight_heavy.inc()

    def _release(self, heavy: bool) -> None:
        assert self._slots is not None and self._heavy_slots is not None
        self._slots.release()
        if heavy:
            self._heavy_slots.release()
            self.metrics.query_inflight_heavy.dec()

    async def _read_body(self, receive: Receive, send: Send) -> list[Message] | None:
        """Every message of the request body, or None once the request was answered (too slow, too large) or
        its client went away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        messages: list[Message] = []
        size = 0
        self.metrics.bodies_pending.inc()
        try:
            while True:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
                except TimeoutError:
                    self.metrics.query_rejected.labels(reason="slow_body").inc()
                    msg = f"the request body did not arrive within {self.body_timeout_s:g} s"
                    await self._send_error(send, 408, msg, "timeout", [(b"connection", b"close")])
                    return None
                if message["type"] != "http.request":
                    return None  # http.disconnect: nobody to answer
                messages.append(message)
                size += len(message.get("body", b""))
                if size > self.max_body_bytes:
                    msg = f"body larger than {self.max_body_bytes} bytes"
                    await self._send_error(send, 413, msg, "too_large", [(b"connection", b"close")])
                    return None
                if not message.get("more_body", False):
                    return messages
        finally:
            self.metrics.bodies_pending.dec()

    async def _run(self, scope: Scope, receive: Receive, send: Send, heavy: bool, left: float) -> None:
        late = False
        answer: list[Message] = []

        async def guarded_send(message: Message) -> None:
            """Kept until the computation ends: a client that reads slowly waits for its answer outside the slot."""
            if not late:
                answer.append(message)

        def finished(t: asyncio.Task[None]) -> None:
            """The slot is freed when the computation really ends, not when the client got its answer."""
            self._release(heavy)
            self.metrics.query_inflight.dec()
            if late and not t.cancelled() and (exc := t.exception()) is not None:
                log.error("a query answered 504 failed later", exc_info=exc)

        task = asyncio.create_task(self.app(scope, receive, guarded_send))  # copies the context: same request id
        task.add_done_callback(finished)
        done, _ = await asyncio.wait({task}, timeout=max(left, 0.0))
        if done:
            await task  # its exceptions propagate to the request-id middleware
            for message in answer:
                await send(message)
            return
        late = True
        self.metrics.query_rejected.labels(reason="deadline").inc()
        log.warning(
            "query passed its deadline of %g s; answered 504, its computation still holds a slot", self.timeout_s
        )
        await self._send_error(send, 504, f"deadline of {self.timeout_s:g} s passed", "timeout", [])

    @staticmethod
    async def _send_error(send: Send, status: int, msg: str, kind: str, headers: list[tuple[bytes, bytes]]) -> None:
        start, body = _error(status, msg, kind, headers)
        await send(start)
        await send(body)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that gives the body already read, then whatever the connection says next (a disconnect)."""

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay


class BodyTimeout(HTTPException):
    """The body did not arrive within the body timeout (a slow client). FastAPI re-raises its HTTPExceptions
    from body parsing unchanged, so this becomes a 408 in the shared error shape."""

    def __init__(self, seconds: float) -> None:
        super().__init__(status_code=408, detail=f"the request body did not arrive within {seconds:g} s")


class BodySizeLimit:
    """Pure ASGI, so the body is never read twice: refuse by Content-Length before reading, or buffer a
    chunked body up to the limit. `per_path` raises the limit for given exact paths (checkpoint uploads).
    The whole body must arrive within `body_timeout_s` (408), so a slow-body client cannot hold a request."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        per_path: dict[str, int] | None = None,
        body_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.default_max = max_bytes
        self.per_path = per_path or {}
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope.get("path", ""), self.default_max)
        if self.body_timeout_s is not None:
            receive = _timed_receive(receive, self.body_timeout_s)
        try:
            await _Limited(self.app, limit)(scope, receive, send)
        except BodyTimeout as exc:  # raised while we buffered a chunked body ourselves
            await field_error(408, "", str(exc.detail), "timeout")(scope, receive, send)


def _timed_receive(receive: Receive, seconds: float) -> Receive:
    """`receive` that raises BodyTimeout once the body has taken longer than `seconds` in total; after the last
    body chunk it is the plain `receive` (waiting for a disconnect is not a slow body)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    done = False

    async def timed() -> Message:
        nonlocal done
        if done:
            return await receive()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise BodyTimeout(seconds)
        try:
            message = await asyncio.wait_for(receive(), remaining)
        except TimeoutError:
            raise BodyTimeout(seconds) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            done = True
        return message

    return timed


class _Limited:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            msg = f"body larger than {self.max_bytes} bytes" if status == 413 else "invalid Content-Length"
            await field_error(status, "", msg)(scope, receive, send)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # No length given (chunked): buffer at most max_bytes, then replay to the app.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await field_error(413, "", f"body larger than {self.max_bytes} bytes", "too_large")(
                    scope, receive, send
                )
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
