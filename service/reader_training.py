"""The cluster reader trained in the background on a served home that has none (`TRAIN_READER`).

The reader is what beats FAISS alone on queries by example, but its recipe takes about an hour of one core, so the
first run's bootstrap cannot wait for it. With this setting the service comes up on FAISS alone and, once its
snapshot is loaded, runs `prunecascade reader` (train, store, dev check) as a child process: one torch thread, a
lower CPU priority than the queries, in the server's process group (a script that ends the server's group ends it
too), its output in `HOME/reader-training.log`. When the child succeeds the service reloads, and the reader
answers by default if its dev check chose it.

One training per home: the child holds an exclusive lock on `HOME/reader-training.lock` for as long as it lives
(inherited, so a server killed alone does not make a restart start a second one). Other worker processes of the
same server wait on that lock and reload when it is released. Stopping the server ends the child; the training
then starts over at the next start. Importing this trains nothing: the training runs in the child."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from cascade.reader import serves
from models.cluster_reader_store import READER_SPEC
from models.registry import write_atomic

if TYPE_CHECKING:
    from service.state import ServiceState

__all__ = ["ReaderTraining", "STATUS_FILE", "LOG_FILE", "LOCK_FILE"]

log = logging.getLogger("prunecascade.reader_training")

STATUS_FILE = "reader-training.json"
LOG_FILE = "reader-training.log"
LOCK_FILE = "reader-training.lock"
NICENESS = 10  # queries first: the training takes what the serving leaves of its core
STOP_GRACE_S = 5.0


class ReaderTraining:
    """Train the reader of `state`'s home in a child process once the first snapshot is loaded, when none is
    stored; `status()` says where it stands (GET /v1/space, `reader_training`)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.home = state.settings.home
        self.steps = state.settings.reader_training_steps
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._spawning = threading.Lock()  # a stop either sees the child or keeps it from being started
        self._started_at = time.time()
        self._state = "waiting for the snapshot"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reader-training", daemon=True)
        self._thread.start()

    def status(self) -> dict[str, Any]:
        recorded = self._recorded()
        return {"state": self._state, "steps": self.steps, "log": f"HOME/{LOG_FILE}", "last": recorded}

    def stop(self) -> None:
        """End the child this process started (by its pid), then let the thread finish."""
        with self._spawning:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._state = "stopped with the server"
        if self._thread is not None:
            self._thread.join(STOP_GRACE_S)

    # -- the thread ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self.state.loaded.wait(1.0):
                if self._stopping.is_set() or self.state.load_error is not None:
                    self._state = "not started: the snapshot did not load"
                    return
            if self._needless():
                return
            with open(self.home / LOCK_FILE, "a+b") as lock:
                if not self._acquire(lock):
                    return
                recorded = self._recorded() or {}
                retried = recorded.get("state") == "failed" and recorded.get("started", 0) >= self._started_at
                if not self._stored():
                    if retried:  # by another worker of this server, after it started: not again
                        self._state = f"failed in another worker process: see HOME/{LOG_FILE}"
                        return
                    if not self._train(lock):
                        return
                self._reload()
        except Exception:  # the service serves on without a reader; the log says why
            self._state = "failed: see the server log"
            log.exception("training the cluster reader in the background failed")

    def _acquire(self, lock: Any) -> bool:
        """The home's training lock, waited for while another worker's child (or one that outlived a server)
        holds it; False when the server stops first."""
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                self._state = "waiting for another process's training"
                if self._stopping.wait(1.0):
                    return False

    def _needless(self) -> bool:
        snapshot = self.state.snapshot
        if self._stored():
            self._state = "not needed: a reader is stored"
            return True
        if snapshot is None or snapshot.embedding is None or snapshot.queries is None:
            self._state = "not possible: the space has no bi-encoder or no dev queries to check a reader on"
            return True
        return False

    def _stored(self) -> bool:
        """Whether a reader is stored beside the space, even a broken one: that is the operator's to replace."""
        return (self.state.settings.space_dir / READER_SPEC).exists()

    def _train(self, lock: Any) -> bool:
        """Run the training child to its end; False when it did not succeed (recorded, logged)."""
        command = [
            sys.executable, "-m", "service.cli", "reader",
            "--home", str(self.home), "--steps", str(self.steps), "--threads", "1",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNECASCADE_TORCH_THREADS": "1"}
        started = time.time()
        with self._spawning, open(self.home / LOG_FILE, "ab") as out:
            if self._stopping.is_set():
                return False
            self._proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                pass_fds=(lock.fileno(),),  # the child holds the lock as long as it lives
            )
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, self._proc.pid, NICENESS)
        self._state = "training"
        self._record({"state": "training", "pid": self._proc.pid, "started": started, "steps": self.steps})
        log.info("training the cluster reader in the background: pid %d, log %s", self._proc.pid, self.home / LOG_FILE)
        code = self._proc.wait()
        seconds = round(time.time() - started, 1)
        if self._stopping.is_set() or code < 0:  # a signal: the server's stop, or one sent to its process group
            self._state = "stopped with the server" if self._stopping.is_set() else f"stopped by signal {-code}"
            self._record({"state": self._state, "started": started, "seconds": seconds})
            return False
        if code != 0:
            self._state = f"failed: exit code {code}, see HOME/{LOG_FILE}"
            self._record({"state": "failed", "returncode": code, "started": started, "seconds": seconds})
            log.warning("the background training of the cluster reader failed (exit code %d): %s", code, LOG_FILE)
            return False
        self._record({"state": "done", "started": started, "seconds": seconds, "steps": self.steps})
        return True

    def _reload(self) -> None:
        _, changed = self.state.reload()
        snapshot = self.state.snapshot
        served = snapshot is not None and serves(snapshot)
        self._state = "done: the reader is served" if served else "done: its dev check did not choose it"
        log.info("cluster reader trained in the background adopted (%s)", ", ".join(changed) or "no change")

    def _recorded(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.home / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _record(self, status: dict[str, Any]) -> None:
        write_atomic(self.home / STATUS_FILE, json.dumps(status))
