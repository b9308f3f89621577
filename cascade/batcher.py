"""Cross-request batching: concurrent queries that run the same stages on the same snapshot are computed as one
batch (`cascade.stage_loop.run_stages_many`), as model servers batch requests.

The first query of a batch leads it: if other batches are being computed at that moment (the server is busy),
it waits up to `max_wait_s` for more queries with the same stages to join, or until `max_batch` have; if
nothing else is running it starts at once (an idle server adds no latency). It then computes the batch in its
own thread and hands every other query its answer. Queries that arrive meanwhile form the next batch.

Deadlines: the leader never waits past the earliest deadline in its batch; a query whose deadline passes between
two stages leaves the batch (DeadlineExceeded, the others go on); a query waiting for a batch computed by
another thread stops waiting at its deadline (DeadlineExceeded). A query's answer is the one it gets alone,
bit for bit (`cascade.stage_loop`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from cascade.engine import CascadeResult, DeadlineExceeded
from cascade.snapshot import Snapshot
from cascade.stage_loop import StageJob, run_stages_many

__all__ = ["Batcher", "BatchStats"]


@dataclass
class _Waiter:
    job: StageJob
    done: threading.Event = field(default_factory=threading.Event)
    result: CascadeResult | BaseException | None = None


@dataclass
class _Open:
    """A batch still taking queries."""

    snapshot: Snapshot
    waiters: list[_Waiter]
    full: threading.Event = field(default_factory=threading.Event)
    closed: bool = False


@dataclass
class BatchStats:
    """Counters for the metrics: batches computed and the queries in them."""

    batches: int = 0
    queries: int = 0
    largest: int = 0


class Batcher:
    """Thread safe; one per process (the service keeps it in its state)."""

    def __init__(
        self, max_wait_s: float = 0.002, max_batch: int = 16, on_batch: Callable[[int], None] | None = None
    ) -> None:
        """`on_batch(size)` is called once per batch computed (the service counts them in its metrics)."""
        if max_wait_s < 0 or max_batch < 1:
            raise ValueError("max_wait_s >= 0 and max_batch >= 1 are required")
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Open] = {}
        self._running = 0  # batches being computed now
        self.stats = BatchStats()
        self.on_batch = on_batch

    def run(self, snapshot: Snapshot, job: StageJob) -> CascadeResult:
        """The job's answer, computed in a batch with whatever concurrent jobs share its stages."""
        me = _Waiter(job)
        key = (id(snapshot), snapshot.id, job.stages, job.target.kind)
        with self._lock:
            batch = self._open.get(key)
            if batch is not None and not batch.closed and batch.snapshot is snapshot:
                batch.waiters.append(me)
                if len(batch.waiters) >= self.max_batch:
                    batch.closed = True
                    del self._open[key]
                    batch.full.set()
                lead = False
            else:
                batch = _Open(snapshot, [me])
                busy = self._running > 0
                if busy and self.max_batch > 1 and self.max_wait_s > 0:
                    self._open[key] = batch
                else:
                    batch.closed = True
                lead = True
        if lead:
            self._lead(key, batch)
        else:
            self._follow(me)
        if isinstance(me.result, BaseException):
            raise me.result
        assert isinstance(me.result, CascadeResult)
        return me.result

    def _lead(self, key: Hashable, batch: _Open) -> None:
        if not batch.closed:
            until = time.monotonic() + self.max_wait_s
            deadline = batch.waiters[0].job.deadline
            if deadline is not None:
                until = min(until, deadline)
            batch.full.wait(max(0.0, until - time.monotonic()))
            with self._lock:
                if not batch.closed:
                    batch.closed = True
                    self._open.pop(key, None)
        with self._lock:
            waiters = list(batch.waiters)
            self._running += 1
            self.stats.batches += 1
            self.stats.queries += len(waiters)
            self.stats.largest = max(self.stats.largest, len(waiters))
        if self.on_batch is not None:
            self.on_batch(len(waiters))
        try:
            results = run_stages_many(batch.snapshot, [w.job for w in waiters])
        except BaseException as exc:  # every query of the batch gets the failure
            results = [exc] * len(waiters)  # type: ignore[list-item]
        finally:
            with self._lock:
                self._running -= 1
        for w, r in zip(waiters, results, strict=True):
            w.result = r
            w.done.set()

    def _follow(self, me: _Waiter) -> None:
        deadline = me.job.deadline
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not me.done.wait(timeout):
            me.result = DeadlineExceeded("deadline passed while its batch was computed")
