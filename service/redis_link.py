"""One guarded Redis client. Every call goes through `run`: a failure or a timeout counts a metric, logs
once per outage, and opens a short circuit so that a down or slow Redis costs queries nothing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from service.metrics import Metrics

__all__ = ["RedisLink", "RedisUnavailable"]

log = logging.getLogger("prunecascade.redis")
T = TypeVar("T")


class RedisUnavailable(RuntimeError):
    """Redis did not answer (or is being skipped after a recent failure)."""


class RedisLink:
    def __init__(self, url: str, prefix: str, timeout_s: float, retry_s: float, metrics: Metrics) -> None:
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self.retry_s = retry_s
        self.metrics = metrics
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._up: bool | None = None
        self._on_recover: list[Callable[[], None]] = []

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def up(self) -> bool:
        return bool(self._up)

    def on_recover(self, callback: Callable[[], None]) -> None:
        """Called (in the calling thread) after the first successful call following an outage."""
        self._on_recover.append(callback)

    def run(self, op: str, fn: Callable[[redis.Redis], T]) -> T:
        if time.monotonic() < self._down_until:
            raise RedisUnavailable(f"redis skipped for {op}: recently down")
        try:
            value = fn(self.client)
        except (redis.RedisError, OSError) as exc:
            self._mark_down(op, exc)
            raise RedisUnavailable(f"redis {op} failed: {exc}") from exc
        self._mark_up()
        return value

    def _mark_down(self, op: str, exc: BaseException) -> None:
        self.metrics.redis_errors.labels(op=op).inc()
        self.metrics.redis_up.set(0)
        with self._lock:
            self._down_until = time.monotonic() + self.retry_s
            was_up, self._up = self._up, False
        if was_up is not False:
            log.warning("redis unavailable (%s: %s); serving without it", op, exc, extra={"redis_op": op})

    def _mark_up(self) -> None:
        self.metrics.redis_up.set(1)
        with self._lock:
            was_up, self._up = self._up, True
        if was_up is False:
            log.warning("redis is back; reconciling")
            for callback in self._on_recover:
                try:
                    callback()
                except Exception:  # a recovery hook must never break the call that noticed the recovery
                    log.exception("redis recovery hook failed")

    def close(self) -> None:
        self.client.close()
