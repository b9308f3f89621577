"""The home read once by the supervisor of forked workers (`prunecascade serve --workers N`), before it forks.

A worker that reads the home itself after the fork holds its own copy of everything the read allocates: the
models, the FAISS centroids, the space's and the queries' objects (on 100,000 items a worker ready to answer holds
37 MiB of its own that way, 16-17 MiB with the home read before the fork: docs/performance.md 0b). Read before the
fork, those pages are shared copy on write by every worker. A worker serves the read only where the home's files
are unchanged since (`home_fingerprint`): one restarted after an operator changed the home reads it as it is now.

The supervisor also builds (or, on a restart, maps) the item-input tables the snapshot's models read, so that a
first start has no builder worker: one worker built them after the fork and kept what the build allocated for its
whole life; the parent's build leaves those pages in the parent, shared with every worker and never touched. It
asks for no exact table and starts no thread, so no thread is running when the supervisor forks; its torch work
runs on one thread, so no worker inherits a thread pool.
"""

from __future__ import annotations

import logging

import torch

from service.settings import Settings
from service.state import LoadedHome, ServiceState

__all__ = ["read_before_fork", "take_preloaded"]

log = logging.getLogger("prunecascade.workers")

_preloaded: LoadedHome | None = None


def read_before_fork(settings: Settings) -> LoadedHome | None:
    """Read the home in this (the supervisor's) process and build its item-input tables, for the workers it forks
    next. A home that cannot be read (not built yet, broken) is left to the workers, which report it as before."""
    global _preloaded
    torch.set_num_threads(1)
    try:
        home = ServiceState(settings).read_home()
        home.snapshot.warm()  # the workers' first load finds the tables built (the same objects, inherited)
        _preloaded = home
    except Exception as exc:
        log.warning("the home was not read before forking (each worker reads it): %s: %s", type(exc).__name__, exc)
        _preloaded = None
    return _preloaded


def take_preloaded() -> LoadedHome | None:
    """The home the parent read before forking this worker, if any: given once, to the worker's state."""
    global _preloaded
    home, _preloaded = _preloaded, None
    return home
