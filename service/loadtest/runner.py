"""The open-loop driver: one asyncio task per scheduled request, latency measured from the scheduled send time
to the response, every request bounded by a deadline counted from its scheduled time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["Outcome", "PointRun", "run_open_loop"]

START_LEAD_S = 0.05  # first send slightly in the future, so task creation does not eat into request 0


@dataclass(frozen=True)
class Outcome:
    """One request: `latency_s` runs from its scheduled send time, so client-side queueing is included."""

    index: int
    scheduled_s: float
    latency_s: float
    status: int | None  # None: no HTTP answer (timeout, connection refused)
    body: dict[str, Any] | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PointRun:
    outcomes: list[Outcome]
    wall_s: float  # first scheduled send to last completion


async def _one(
    client: httpx.AsyncClient,
    index: int,
    offset: float,
    start: float,
    request: tuple[str, dict[str, Any]],
    timeout: float,
    gate: asyncio.Semaphore,
) -> Outcome:
    loop = asyncio.get_running_loop()
    scheduled = start + offset
    path, body = request
    status: int | None = None
    payload: dict[str, Any] | None = None
    error: str | None = None
    try:
        async with asyncio.timeout_at(scheduled + timeout), gate:
            response = await client.post(path, json=body)
        status = response.status_code
        if status == 200:
            payload = response.json()
        else:
            error = f"HTTP {status}: {response.text[:200]}"
    except TimeoutError:
        error = f"timeout after {timeout:g}s from the scheduled send"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    return Outcome(index, offset, loop.time() - scheduled, status, payload, error)


async def run_open_loop(
    client: httpx.AsyncClient,
    offsets: Sequence[float],
    make_request: Callable[[int], tuple[str, dict[str, Any]]],
    timeout: float,
    max_in_flight: int = 256,
    on_done: Callable[[Outcome], None] | None = None,
) -> PointRun:
    """Send request i at start + offsets[i] whatever happened to earlier ones (open loop).

    `max_in_flight` caps open connections; a request waiting for a slot is still timed from its schedule.
    The whole point ends by last offset + timeout at the latest."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(max_in_flight)
    start = loop.time() + START_LEAD_S
    tasks: list[asyncio.Task[Outcome]] = []
    for i, offset in enumerate(offsets):
        delay = start + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_one(client, i, offset, start, make_request(i), timeout, gate))
        if on_done is not None:
            task.add_done_callback(lambda t: on_done(t.result()) if not t.cancelled() else None)
        tasks.append(task)
    outcomes = list(await asyncio.gather(*tasks))
    wall = max((o.scheduled_s + o.latency_s for o in outcomes), default=0.0)
    return PointRun(outcomes, wall)
