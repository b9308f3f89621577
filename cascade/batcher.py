"""Cross-request batching: concurrent queries that run the same stages on the same snapshot are computed as one
batch (`cascade.stage_loop.run_stages_many`), as model servers batch requests.

A query announces itself when it is admitted (`expect()`, called by the query limiter when it takes its slot:
it is still to be parsed and planned) and joins a batch when its stages are ready to run (`run`). The first
query of a batch leads it: while another batch is being computed (the cores are busy anyway) and announced
queries are on their way, it waits for them to join, up to `max_wait_s` or until `max_batch` have, or until
the cores are free again; otherwise it starts at once (one client, or an idle server, waits for nothing).
It then computes the batch in its own thread and hands every other query its answer. Queries that arrive
meanwhile form the next batch.

Deadlines: the leader never waits past its own deadline; a query whose deadline passes between two stages
leaves the batch (DeadlineExceeded, the others go on); a query waiting for a batch computed by another thread
stops waiting at its deadline (DeadlineExceeded). A query's answer is the one it gets alone, bit for bit
(`cascade.stage_loop`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from cascade.engine import CascadeResult, DeadlineExceeded
from cascade.snapshot import Snapshot
from cascade.stage_loop import StageJob, run_stages_many

__all__ = ["Batcher", "BatchStats", "Expected"]


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
    closed: bool = False


class Expected:
    """A query on its way to the batcher (`Batcher.expect`): consumed by `run`, or released by `cancel` (or
    leaving the `with` block) when the query will not run stages after all (an error, an exact or FAISS-only
    answer)."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self.pending = True

    def cancel(self) -> None:
        self._batcher._arrived(self)

    def __enter__(self) -> Expected:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


@dataclass
class BatchStats:
    """Counters for the metrics: batches computed and the queries in them."""

    batches: int = 0
    queries: int = 0
    largest: int = 0


class Batcher:
    """Thread safe; one per process (the service keeps it in its state)."""

    def __init__(
        self, max_wait_s: float = 0.005, max_batch: int = 16, on_batch: Callable[[int], None] | None = None
    ) -> None:
        """`on_batch(size)` is called once per batch computed (the service counts them in its metrics)."""
        if max_wait_s < 0 or max_batch < 1:
            raise ValueError("max_wait_s >= 0 and max_batch >= 1 are required")
        self.max_wait_s = max_wait_s
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a query joined, or one on its way arrived or left
        self._open: dict[Hashable, _Open] = {}
        self._on_way = 0  # announced queries that have not reached `run` (or cancelled) yet
        self._running = 0  # batches being computed now
        self.stats = BatchStats()
        self.on_batch = on_batch

    def expect(self) -> Expected:
        """Announce a query that will probably run stages soon: a leader waits for it (within `max_wait_s`)."""
        with self._lock:
            self._on_way += 1
        return Expected(self)

    def _arrived(self, token: Expected) -> None:
        with self._lock:
            if token.pending:
                token.pending = False
                self._on_way -= 1
                self._changed.notify_all()

    def run(self, snapshot: Snapshot, job: StageJob, expected: Expected | None = None) -> CascadeResult:
        """The job's answer, computed in a batch with whatever concurrent jobs share its stages. `expected`: the
        token `expect()` gave this query (it has arrived)."""
        me = _Waiter(job)
        key = (id(snapshot), snapshot.id, job.stages, job.target.kind)
        with self._lock:
            if expected is not None and expected.pending:
                expected.pending = False
                self._on_way -= 1
            batch = self._open.get(key)
            if batch is not None and not batch.closed and batch.snapshot is snapshot:
                batch.waiters.append(me)
                if len(batch.waiters) >= self.max_batch:
                    self._close(key, batch)
                lead = False
            else:
                batch = _Open(snapshot, [me])
                if self._worth_waiting():
                    self._open[key] = batch
                else:
                    batch.closed = True
                lead = True
            self._changed.notify_all()
        if lead:
            self._lead(key, batch)
        else:
            self._follow(me)
        if isinstance(me.result, BaseException):
            raise me.result
        assert isinstance(me.result, CascadeResult)
        return me.result

    def _worth_waiting(self) -> bool:
        """Wait for company only while another batch is computing (the cores are busy anyway) and queries are on
        their way: with the cores free, waiting would only idle them. Called with the lock held."""
        return self._running > 0 and self._on_way > 0 and self.max_batch > 1 and self.max_wait_s > 0

    def _close(self, key: Hashable, batch: _Open) -> None:
        batch.closed = True
        if self._open.get(key) is batch:
            del self._open[key]

    def _lead(self, key: Hashable, batch: _Open) -> None:
        with self._lock:
            if not batch.closed:  # wait while others are on their way, up to max_wait (and the deadline)
                until = time.monotonic() + self.max_wait_s
                deadline = batch.waiters[0].job.deadline
                if deadline is not None:
                    until = min(until, deadline)
                while not batch.closed and self._worth_waiting() and (left := until - time.monotonic()) > 0:
                    self._changed.wait(left)
                self._close(key, batch)
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
                self._changed.notify_all()  # the cores are free: a batch waiting for company starts
        for w, r in zip(waiters, results, strict=True):
            w.result = r
            w.done.set()

    def _follow(self, me: _Waiter) -> None:
        deadline = me.job.deadline
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not me.done.wait(timeout):
            me.result = DeadlineExceeded("deadline passed while its batch was computed")
