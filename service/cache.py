"""The query result cache. The key is a hash of the canonical request and the snapshot id, so a swap
invalidates every entry by construction (old entries just age out). Redis when configured (shared by
replicas, TTL on each key); otherwise an in-process TTL + LRU dict. With Redis, a small in-process copy is kept
as well and answers while Redis is down, so an outage does not cost the hit rate."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

from service.metrics import Metrics
from service.redis_link import RedisLink, RedisUnavailable

__all__ = ["ResultCache", "LocalCache", "RedisCache", "cache_key"]


def cache_key(request: dict[str, Any], snapshot_id: str) -> str:
    blob = json.dumps({"q": request, "s": snapshot_id}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultCache(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes) -> None: ...


class LocalCache:
    def __init__(self, ttl_s: float, max_entries: int, metrics: Metrics, backend: str = "local") -> None:
        self.backend = backend
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.metrics = metrics
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        now = time.monotonic()
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and hit[0] > now:
                self._data.move_to_end(key)
                self.metrics.cache_hits.labels(backend=self.backend).inc()
                return hit[1]
            if hit is not None:
                del self._data[key]
        self.metrics.cache_misses.labels(backend=self.backend).inc()
        return None

    def set(self, key: str, value: bytes) -> None:
        with self._lock:
            self._data[key] = (time.monotonic() + self.ttl_s, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)


class RedisCache:
    """Redis first; `fallback` (an in-process LocalCache holding every answer set here) only while Redis is
    unavailable. Its hits and misses count under backend `fallback`."""

    backend = "redis"

    def __init__(self, link: RedisLink, ttl_s: int, metrics: Metrics, fallback: LocalCache | None = None) -> None:
        self.link = link
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.fallback = fallback

    def get(self, key: str) -> bytes | None:
        try:
            value = self.link.run("cache_get", lambda r: r.get(self.link.key("cache", key)))
        except RedisUnavailable:
            if self.fallback is not None:
                return self.fallback.get(key)
            self.metrics.cache_misses.labels(backend="unavailable").inc()
            return None
        counter = self.metrics.cache_hits if value is not None else self.metrics.cache_misses
        counter.labels(backend=self.backend).inc()
        return value  # type: ignore[return-value]

    def set(self, key: str, value: bytes) -> None:
        if self.fallback is not None:
            self.fallback.set(key, value)
        with contextlib.suppress(RedisUnavailable):
            self.link.run("cache_set", lambda r: r.set(self.link.key("cache", key), value, ex=self.ttl_s))
