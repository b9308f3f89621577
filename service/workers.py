"""Worker processes forked from one parent that has imported the service (`prunecascade serve --workers N`).

uvicorn's own `--workers` spawns every worker as a fresh interpreter, and each imports torch, FAISS, FastAPI and
the service again: about 270 MiB of private memory per worker on the default space, twice its item cache
(docs/performance.md 0b). Forked from a parent that imported them once, the workers share those pages copy on
write, and each adds only what it allocates itself. The parent freezes its objects out of the garbage
collector before forking, so that a worker's collections do not write to, and so copy, the shared pages.

The parent imports the service and reads the home (`service/preload.py`, on one torch thread, no thread of its own
started), so the workers share the loaded models and indexes too; it computes nothing else: no thread pool has
started when it forks, so no worker inherits a half-made runtime. (A bootstrap, which trains, runs in a process of
its own for the same reason.) It keeps N workers alive, replacing one that dies, and stops them all on SIGINT or
SIGTERM.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import socket
import threading
import time

import uvicorn

from service.malloc_arenas import release_free_memory

__all__ = ["serve_forked", "RESTART_PAUSE_S"]

log = logging.getLogger("prunecascade.workers")

RESTART_PAUSE_S = 1.0  # a worker that dies at once (a bad home) is not restarted in a tight loop
STOP_GRACE_S = 20.0  # what a worker gets to finish its requests before it is killed


def _serve(config: uvicorn.Config, sock: socket.socket) -> None:
    uvicorn.Server(config).run(sockets=[sock])


def serve_forked(config: uvicorn.Config, workers: int) -> int:
    """Bind the port once, fork `workers` uvicorn servers on it, and supervise them until SIGINT or SIGTERM."""
    import service.app  # noqa: F401  (the import the workers share)

    sock = config.bind_socket()
    gc.collect()
    gc.freeze()
    release_free_memory()  # what the parent freed is not copied into every worker (service/malloc_arenas.py)
    fork = multiprocessing.get_context("fork")
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    def start(i: int) -> multiprocessing.process.BaseProcess:
        proc = fork.Process(target=_serve, args=(config, sock), name=f"worker-{i}")
        proc.start()
        return proc

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        for i in range(workers):
            procs.append(start(i))  # one by one: a start that fails leaves the started ones to the finally
        while not stop.wait(RESTART_PAUSE_S):
            for i, p in enumerate(procs):
                if not p.is_alive():
                    log.warning("worker %d (pid %s) exited with %s; starting another", i, p.pid, p.exitcode)
                    procs[i] = start(i)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn finishes the requests in flight, then exits
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        sock.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
