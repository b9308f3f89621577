"""A first run answers before its pair models are trained: the bootstrap hands the server a home that can answer
(classifiers, bi-encoder, space, FAISS index; `cascade.json` without pair stages) and goes on, over real uvicorn.

The home is the suite's tiny one with its pair models, cascade config and record removed, as a first run stopped
after its space was built; the same code path as a fresh home, at a size a test can afford. The bootstrap is held
after the early load until the test has looked, so that what is served meanwhile is seen, not raced."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import TINY, TINY_PAIR, free_port
from service_fixtures import wait_for

from cascade.bootstrap import bootstrap
from cascade.bootstrap_record import RECORD_FILE, read_record
from cascade.config import CONFIG_FILE, CascadeConfig
from cascade.queries import QuerySet
from models.registry import ModelRegistry
from service.app import create_app
from service.settings import Settings
from service.state import ServiceState

SPACE = Path("spaces") / "default"

# The suite's tiny recipe with a few training steps per pair model: what is tested is when they are served
QUICK = replace(
    TINY,
    pair=replace(
        TINY_PAIR,
        training=replace(TINY_PAIR.training, steps=40, eval_every=20),
        listwise=replace(TINY_PAIR.listwise, steps=20, eval_every=10),
        variants=tuple(replace(v, finetune_steps=20) for v in TINY_PAIR.variants),
    ),
)


@pytest.fixture
def half_built(tiny_home: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    for name in [TINY_PAIR.dense_name, *(v.name for v in TINY_PAIR.variants)]:
        shutil.rmtree(home / "registry" / name)
    (home / CONFIG_FILE).unlink()
    (home / RECORD_FILE).unlink()
    return home


@pytest.fixture
def serving(half_built: Path) -> Iterator[tuple[str, threading.Event, dict]]:
    """Real uvicorn whose loader thread runs the bootstrap; yields (url, the gate that lets the bootstrap go on
    after its early load, what the early load saw)."""
    gate, seen = threading.Event(), {}

    def early(state: ServiceState) -> None:
        # What is on disk when the early load starts, read before it: once loaded the server is ready, and the
        # test may look at `seen` at once
        seen["config"] = CascadeConfig.load(half_built / CONFIG_FILE)
        seen["pair_models"] = ModelRegistry(half_built / "registry").active_version(TINY_PAIR.dense_name)
        state.load_early()
        assert gate.wait(120), "the test never let the bootstrap go on"

    def build(state: ServiceState) -> None:
        bootstrap(
            half_built, QUICK, progress=False, on_progress=state.report_bootstrap, on_servable=lambda: early(state)
        )

    app = create_app(Settings(home=half_built, cache_enabled=False), build)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout=30)
    try:
        yield f"http://127.0.0.1:{server.config.port}", gate, seen
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)


def _ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz", timeout=10).status_code == 200


def test_the_first_run_answers_from_faiss_alone_while_its_pair_models_train_then_serves_them(
    serving: tuple[str, threading.Event, dict], half_built: Path
) -> None:
    url, gate, seen = serving
    example = QuerySet.load(half_built / SPACE).split("dev").x[0]
    query = {"target": {"examples": [np.asarray(example).tolist()]}, "k": 3}

    assert wait_for(lambda: _ready(url), timeout=120)
    assert seen["config"].pair_dense is None and seen["config"].pair_stages is None
    assert seen["pair_models"] is None  # ready before any pair model exists
    assert "bootstrap" in httpx.get(f"{url}/healthz", timeout=10).json()  # and says the bootstrap goes on
    early = httpx.post(f"{url}/v1/query", json=query, timeout=30)
    assert early.status_code == 200 and early.json()["mode"] == "faiss", early.text
    assert len(early.json()["clusters"]) == 3
    label = httpx.post(f"{url}/v1/query", json={"target": {"label": 3}, "k": 3}, timeout=30)
    assert label.status_code == 200 and label.json()["mode"] == "exact", label.text

    gate.set()  # the pair models train, then the server reloads
    assert wait_for(lambda: "bootstrap" not in httpx.get(f"{url}/healthz", timeout=10).json(), timeout=300)
    config = CascadeConfig.load(half_built / CONFIG_FILE)
    assert config.pair_dense == TINY_PAIR.dense_name and tuple(config.pair_stages) == TINY_PAIR.stages
    assert read_record(half_built)["state"] == "complete"
    later = wait_for(lambda: httpx.post(f"{url}/v1/query", json=query, timeout=30).json()["mode"] == "cascade", 60)
    assert later, "the pair cascade (TINY keeps its stages as the default) is not served after the bootstrap"


def test_a_completed_home_keeps_a_cascade_config_without_pair_stages(half_built: Path) -> None:
    """Only the run that wrote `cascade.json` early adds the pair stages: an operator's config of a completed home
    is not rewritten by a later bootstrap."""
    config = CascadeConfig(stages=TINY.stages, dense=TINY.dense_name)
    config.save(half_built / CONFIG_FILE)
    (half_built / RECORD_FILE).write_text('{"state": "complete"}')
    for name in [TINY_PAIR.dense_name, *(v.name for v in TINY_PAIR.variants)]:
        assert ModelRegistry(half_built / "registry").active_version(name) is None
    called = []
    bootstrap(half_built, QUICK, progress=False, on_servable=lambda: called.append(True))
    assert called == [True]  # pair models were missing: the home could answer before they were trained
    assert CascadeConfig.load(half_built / CONFIG_FILE).pair_dense is None
