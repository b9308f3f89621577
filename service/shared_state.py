"""Registry state shared by replicas through Redis: the active version of each name (hash `P:active`) and
the default cascade (string `P:cascade`). A change is written there and announced on `P:events`; every
replica also reconciles at start and every `reconcile_interval_s`, since pub/sub drops messages while a
subscriber is disconnected. Checkpoint files are not in Redis: they live in the registry directory, which
replicas share (a mounted volume), so Redis only ever holds small values.

Redis down: changes apply locally and are remembered as dirty; the first reconcile after Redis answers again
pushes them (last writer wins), and a restarted, empty Redis is seeded from the local state."""

from __future__ import annotations

import contextlib
import json
import logging
import threading

import redis

from cascade.config import CascadeConfig
from service.redis_link import RedisLink, RedisUnavailable
from service.state import ServiceState

__all__ = ["SharedState"]

log = logging.getLogger("prunecascade.shared")


class SharedState:
    def __init__(self, link: RedisLink, state: ServiceState, interval_s: float) -> None:
        self.link = link
        self.state = state
        self.interval_s = interval_s
        self._dirty_names: set[str] = set()
        self._dirty_cascade = False
        self._dirty_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.active_key = link.key("active")
        self.cascade_key = link.key("cascade")
        self.channel = link.key("events")
        link.on_recover(self._wake.set)

    # -- announcing local changes ---------------------------------------------------------------------------
    def mark_dirty(self, name: str | None) -> None:
        """A local change to `name` (None: the cascade) that Redis does not know yet. Called under the state
        lock, in the same step as the change, so a reconcile can never adopt a stale value over it."""
        with self._dirty_lock:
            if name is None:
                self._dirty_cascade = True
            else:
                self._dirty_names.add(name)

    def dirty(self) -> tuple[set[str], bool]:
        with self._dirty_lock:
            return set(self._dirty_names), self._dirty_cascade

    def push(self) -> bool:
        """Write every dirty value to Redis and announce it; on failure they stay dirty for the next try.
        Under the state lock (bounded by the Redis timeout), so values and dirty flags move together; a
        successful push bumps the generation, which makes any reconcile that read Redis before it stand down."""
        with self.state.lock:
            names, cascade = self.dirty()
            if not names and not cascade:
                return True
            active = self.state.active
            snapshot = self.state.snapshot

            def write(r: redis.Redis) -> None:
                pipe = r.pipeline(transaction=True)
                for name in names:
                    if name in active:
                        pipe.hset(self.active_key, name, active[name])
                if cascade and snapshot is not None:
                    pipe.set(self.cascade_key, self.state.config.model_dump_json())
                pipe.publish(self.channel, json.dumps({"names": sorted(names), "cascade": cascade}))
                pipe.execute()

            try:
                self.link.run("publish", write)
            except RedisUnavailable as exc:
                log.warning("change applied locally only; will sync when redis is back (%s)", exc)
                return False
            with self._dirty_lock:
                self._dirty_names.clear()
                self._dirty_cascade = False
            self.state.generation += 1
        return True

    # -- converging ------------------------------------------------------------------------------------------
    def reconcile(self) -> bool:
        """Push what is dirty, seed an empty Redis, then adopt what Redis says. Returns whether Redis answered."""
        if not self.push():
            return False
        generation = self.state.generation
        active = self.state.active
        snapshot = self.state.snapshot
        if snapshot is None:
            return False

        def seed_and_read(r: redis.Redis) -> tuple[dict[bytes, bytes], bytes | None]:
            pipe = r.pipeline(transaction=True)
            for name, version in active.items():
                pipe.hsetnx(self.active_key, name, version)
            pipe.setnx(self.cascade_key, self.state.config.model_dump_json())
            pipe.hgetall(self.active_key)
            pipe.get(self.cascade_key)
            out = pipe.execute()
            return out[-2], out[-1]

        try:
            raw_active, raw_cascade = self.link.run("reconcile", seed_and_read)
        except RedisUnavailable:
            return False
        shared_active = {k.decode(): int(v) for k, v in raw_active.items()}
        config = None
        if raw_cascade is not None:
            try:
                config = CascadeConfig.model_validate_json(raw_cascade)
            except ValueError:
                log.error("shared cascade config in redis is invalid; keeping the local one")
        try:
            self.state.adopt(shared_active, config, generation)
        except Exception:  # a bad shared state must not take the replica down; keep serving the current one
            log.exception("could not adopt the shared state; keeping the current snapshot")
        return True

    # -- background threads ----------------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self._reconcile_loop, "redis-reconcile"), (self._listen, "redis-listen")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _reconcile_loop(self) -> None:
        self.state.loaded.wait()
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # never let the loop die
                log.exception("reconcile failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _listen(self) -> None:
        """Any event wakes the reconcile loop, which re-reads everything: one code path for both triggers."""
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.link.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        self._wake.set()
            except (redis.RedisError, OSError):
                self._stop.wait(max(self.link.retry_s, 0.2))
            finally:
                if pubsub is not None:
                    with contextlib.suppress(redis.RedisError, OSError):
                        pubsub.close()
