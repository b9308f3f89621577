"""The first run listens at once: while the loader thread bootstraps, /healthz reports the progress and /readyz
is 503 with it; then the snapshot loads and /readyz turns 200."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from cascade.bootstrap import Progress
from service.reader_training import ReaderTraining
from service.routes import health
from service.settings import Settings
from service.state import ServiceState


def test_health_reports_the_bootstrap_and_readiness_waits_for_it(tiny_home: Path) -> None:
    state = ServiceState(Settings(home=tiny_home))
    release = threading.Event()

    def bootstrap_stand_in() -> None:  # the real bootstrap reports through the same callback (next test)
        state.report_bootstrap(3, 7, "training pair-dense")
        release.wait(30)

    app = FastAPI()
    app.state.service = state
    app.include_router(health.router)
    thread = state.load_in_background(bootstrap_stand_in)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while state.bootstrap_progress is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get("/healthz").json() == {
            "status": "ok",
            "bootstrap": {"done": 3, "total": 7, "step": "training pair-dense"},
        }
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["progress"] == {"done": 3, "total": 7, "step": "training pair-dense"}
        assert ready.json()["error"] is None  # in progress is not an error
        release.set()
        thread.join(60)
        assert client.get("/readyz").status_code == 200
        assert client.get("/healthz").json() == {"status": "ok"}


def test_progress_counts_steps_and_tells_the_callback() -> None:
    seen: list[tuple[int, int, str]] = []
    steps = Progress(2, show=False, on_progress=lambda d, t, w: seen.append((d, t, w)))
    steps.start("data")
    steps.done()
    steps.start("training")
    steps.done()
    steps.close()
    assert seen == [(0, 2, "data"), (1, 2, "data"), (1, 2, "training"), (2, 2, "training")]


def test_a_bootstrap_failing_after_its_early_load_stays_ready_and_says_where_it_failed(tiny_home: Path) -> None:
    """A first run that could answer before its pair models were trained keeps answering when their training fails,
    and says so: /readyz stays 200 with the error, /healthz names the step it stopped at and the error (before,
    only the log did, and /healthz showed the step as if it were still running)."""
    state = ServiceState(Settings(home=tiny_home))

    def bootstrap_stand_in() -> None:
        state.report_bootstrap(5, 7, "training pair-dense")
        state.load_early()
        raise RuntimeError("pair-dense: out of memory")

    app = FastAPI()
    app.state.service = state
    app.include_router(health.router)
    training = ReaderTraining(state)  # as TRAIN_READER starts it: it must not train on a home that failed
    training.start()
    state.load_in_background(bootstrap_stand_in).join(120)
    refused = "not started: the first run's bootstrap failed (see /readyz)"
    deadline = time.monotonic() + 30
    while training.status()["state"] != refused and time.monotonic() < deadline:
        time.sleep(0.05)
    assert training.status()["state"] == refused
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["snapshot_id"] == state.snapshot.id
        assert ready.json()["error"] == "RuntimeError: pair-dense: out of memory"
        assert client.get("/healthz").json() == {
            "status": "ok",
            "bootstrap": {"done": 5, "total": 7, "step": "training pair-dense"},
            "error": "RuntimeError: pair-dense: out of memory",
        }
