"""The cluster reader trained in the background on a served home that has none (`TRAIN_READER`).

The reader is what beats FAISS alone on queries by example, but its recipe takes about an hour of one core, so the
first run's bootstrap cannot wait for it. With this setting the service comes up on FAISS alone and, once its
snapshot is loaded, runs `prunecascade reader` (train, store, dev check) as a child process: one torch thread, a
lower CPU priority than the queries, in the server's process group (a script that ends the server's group ends it
too), its output in `HOME/reader-training.log`. When the child succeeds the service reloads, and the reader
answers by default if its dev check chose it.

A shorter reader comes first (`READER_TRAINING_FIRST_STEPS`, 4,000 steps, about a quarter of the time): it is
trained, checked and served, then the full one is trained the same way and replaces it. Should the full one's check
not choose it, the first is served again (the store keeps the reader it replaced). A restart goes on with the stages
left, as long as the stored reader is the one this training made (its sha256 is in the record).

One training per home: the child holds an exclusive lock on `HOME/reader-training.lock` for as long as it lives
(inherited, so a server killed alone does not make a restart start a second one). Other worker processes of the
same server wait on that lock, adopt each reader the training stores, and reload when the lock is released.
Stopping the server ends the child; its stage then starts over at the next start. Importing this trains nothing:
the training runs in the child."""

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
from models.cluster_reader_store import READER_SPEC, stored_digest
from models.registry import write_atomic
from service.reader_admin import roll_back

if TYPE_CHECKING:
    from service.state import ServiceState

__all__ = ["ReaderTraining", "STATUS_FILE", "LOG_FILE", "LOCK_FILE", "training_stages", "stages_left"]

log = logging.getLogger("prunecascade.reader_training")

STATUS_FILE = "reader-training.json"
LOG_FILE = "reader-training.log"
LOCK_FILE = "reader-training.lock"
NICENESS = 10  # queries first: the training takes what the serving leaves of its core
STOP_GRACE_S = 5.0


def training_stages(first: int, steps: int) -> tuple[int, ...]:
    """The step counts trained in turn: a shorter reader first where one is asked for, then the full one."""
    return (first, steps) if 0 < first < steps else (steps,)


def stages_left(stages: tuple[int, ...], stored: str | None, trained: dict[str, Any] | None) -> tuple[int, ...]:
    """What is left to train: every stage with no reader stored; the stages after the one whose reader is stored,
    where that reader is one this training made (`trained`: the steps and sha256 of the last stage it stored);
    nothing where the stored reader is anyone else's (an upload, `prunecascade reader` by hand, a broken file)."""
    if stored is None:
        return stages
    if not trained or trained.get("sha256") != stored or trained.get("steps") not in stages:
        return ()
    return stages[stages.index(trained["steps"]) + 1 :]


class ReaderTraining:
    """Train the reader of `state`'s home in a child process once the first snapshot is loaded, when none is
    stored; `status()` says where it stands (GET /v1/space, `reader_training`)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.home = state.settings.home
        self.steps = state.settings.reader_training_steps
        self.stages = training_stages(state.settings.reader_training_first_steps, self.steps)
        self._adopted: str | None = None  # the sha256 of the last reader this process reloaded for
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
        return {
            "state": self._state,
            "steps": self.steps,
            "stages": list(self.stages),
            "log": f"HOME/{LOG_FILE}",
            "last": recorded,
        }

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
            # after the whole first-run bootstrap, which may serve before it ends: both write cascade.json
            while not self.state.settled.wait(1.0):
                if self._stopping.is_set():
                    self._state = "stopped with the server"
                    return
                if self.state.snapshot is not None:
                    self._state = "waiting for the first run's bootstrap to end"
            if self.state.snapshot is None:
                self._state = "not started: the snapshot did not load"
                return
            if self.state.load_error is not None:  # an early load served; the failed bootstrap may have removed files
                self._state = "not started: the first run's bootstrap failed (see /readyz)"
                return
            if self._needless():
                return
            with open(self.home / LOCK_FILE, "a+b") as lock:
                if not self._acquire(lock):
                    return
                left = self._left()
                for steps in left:
                    recorded = self._recorded() or {}
                    retried = recorded.get("state") == "failed" and recorded.get("started", 0) >= self._started_at
                    if retried:  # by another worker of this server, after it started: not again
                        self._state = f"failed in another worker process: see HOME/{LOG_FILE}"
                        return
                    served_before = self._serving()
                    if not self._train(lock, steps):
                        return
                    self._adopt(final=steps == left[-1], served_before=served_before)
                if not left:
                    self._adopt(final=True, served_before=False)
        except Exception:  # the service serves on without a reader; the log says why
            self._state = "failed: see the server log"
            log.exception("training the cluster reader in the background failed")

    def _acquire(self, lock: Any) -> bool:
        """The home's training lock, waited for while another worker's child (or one that outlived a server)
        holds it, adopting each reader that training stores meanwhile; False when the server stops first."""
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                self._state = "waiting for another process's training"
                trained = (self._recorded() or {}).get("trained") or {}
                if trained.get("sha256") not in (None, self._adopted):
                    self._adopted = trained["sha256"]
                    self.state.reload()
                if self._stopping.wait(1.0):
                    return False

    def _needless(self) -> bool:
        snapshot = self.state.snapshot
        if not self._left():
            self._state = "not needed: a reader is stored"
            return True
        if snapshot is None or snapshot.embedding is None or snapshot.queries is None:
            self._state = "not possible: the space has no bi-encoder or no dev queries to check a reader on"
            return True
        return False

    def _left(self) -> tuple[int, ...]:
        """The stages still to train. A reader stored beside the space, even a broken one, that this training did
        not make is the operator's to replace."""
        space = self.state.settings.space_dir
        stored = None
        if (space / READER_SPEC).exists():
            stored = stored_digest(space)
            if stored is None:
                return ()  # a broken spec file: stored, but by no one this training knows
        return stages_left(self.stages, stored, (self._recorded() or {}).get("trained"))

    def _serving(self) -> bool:
        snapshot = self.state.snapshot
        return snapshot is not None and serves(snapshot)

    def _train(self, lock: Any, steps: int) -> bool:
        """Run the training child of one stage to its end; False when it did not succeed (recorded, logged)."""
        command = [
            sys.executable, "-m", "service.cli", "reader",
            "--home", str(self.home), "--steps", str(steps), "--threads", "1",
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
        # the record first, then the state: whoever reads a new state finds the record that goes with it
        self._record({"state": "training", "pid": self._proc.pid, "started": started, "steps": steps})
        self._state = "training"  # which stage: the record's steps
        log.info("training the cluster reader in the background: pid %d, log %s", self._proc.pid, self.home / LOG_FILE)
        code = self._proc.wait()
        seconds = round(time.time() - started, 1)
        if self._stopping.is_set() or code < 0:  # a signal: the server's stop, or one sent to its process group
            stopped = "stopped with the server" if self._stopping.is_set() else f"stopped by signal {-code}"
            self._record({"state": stopped, "started": started, "seconds": seconds})
            self._state = stopped
            return False
        if code != 0:
            self._record({"state": "failed", "returncode": code, "started": started, "seconds": seconds})
            self._state = f"failed: exit code {code}, see HOME/{LOG_FILE}"
            log.warning("the background training of the cluster reader failed (exit code %d): %s", code, LOG_FILE)
            return False
        trained = {"steps": steps, "sha256": stored_digest(self.state.settings.space_dir)}
        self._record({"state": "done", "started": started, "seconds": seconds, "steps": steps, "trained": trained})
        return True

    def _adopt(self, final: bool, served_before: bool) -> None:
        """Reload for the reader just stored. A later stage's reader that its check did not choose, where the
        one before it was served, gives way to that one again."""
        _, changed = self.state.reload()
        self._adopted = ((self._recorded() or {}).get("trained") or {}).get("sha256")
        served = self._serving()
        if not served and served_before:
            roll_back(self.state)
            self._state = "done: its dev check did not choose it, so the reader before it serves again"
            log.warning("the background reader's dev check did not choose it: the one before it serves again")
            return
        verdict = "the reader is served" if served else "its dev check did not choose it"
        self._state = f"done: {verdict}" if final else f"first stage done: {verdict}; training the full reader next"
        log.info("cluster reader trained in the background adopted (%s)", ", ".join(changed) or "no change")

    def _recorded(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.home / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _record(self, status: dict[str, Any]) -> None:
        """The status file, carrying forward the last stage stored (`trained`) until a later one replaces it."""
        carried = (self._recorded() or {}).get("trained")
        write_atomic(self.home / STATUS_FILE, json.dumps({**status, "trained": status.get("trained", carried)}))
