"""The cluster reader trained in the background (`TRAIN_READER`, service/reader_training.py), over real uvicorn on
a tiny bootstrapped home: a home with no reader trains one in a child process and serves it once its dev check
chooses it (after waiting for the training another process holds the home's lock for), a home with one trains
nothing, and stopping the server ends the child it started."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import Server, start_server, stop_server
from service_fixtures import faiss_by_default

from cascade.config import CONFIG_FILE, READER_RULE, CascadeConfig, ReaderChoice
from cascade.embedding import EmbeddingIndex
from cascade.queries import QuerySet
from cascade.reader import serves
from cascade.space import Space
from models.cluster_reader import ReaderSpec, build_ranker
from models.cluster_reader_store import READER_PREVIOUS, load_reader, save_reader
from models.cluster_reader_training import ReaderTrainConfig
from service.reader_training import LOCK_FILE, LOG_FILE, STATUS_FILE, ReaderTraining, stages_left, training_stages
from service.settings import Settings
from service.state import ServiceState

SPACE = Path("spaces") / "default"


def _training(url: str) -> dict:
    return httpx.get(f"{url}/v1/space", timeout=30).json()["reader_training"]


def _wait_for(url: str, done: callable, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _training(url)
        if done(status):
            return status
        time.sleep(0.5)
    raise AssertionError(f"the background training did not get there: {status}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_home_without_a_reader_trains_a_short_one_then_the_full_one_in_the_background(tiny_home, tmp_path) -> None:
    """Both stages in one server, after waiting for another process's training: the first reader is served once
    its check chooses it, then the full one replaces it (or, had the full one's check not chosen it, the first is
    served again)."""
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    faiss_by_default(home)  # the check of a 60-step reader: against FAISS alone
    assert load_reader(home / SPACE) is None
    example = QuerySet.load(home / SPACE).split("dev").x[0]
    query = {"target": {"examples": [np.asarray(example).tolist()]}, "k": 3}
    env = {
        "PRUNECASCADE_TRAIN_READER": "true",
        "PRUNECASCADE_READER_TRAINING_FIRST_STEPS": "50",
        "PRUNECASCADE_READER_TRAINING_STEPS": "60",
    }
    lock = (home / LOCK_FILE).open("a+b")
    fcntl.flock(lock, fcntl.LOCK_EX)  # as another worker's training would: the server waits for it
    server = start_server(home, env)
    try:
        _wait_for(server.url, lambda s: s["state"] == "waiting for another process's training", timeout=60)
        # the service answers from FAISS alone until a reader is trained and checked
        assert httpx.post(f"{server.url}/v1/query", json=query, timeout=30).json()["mode"] != "reader"
        lock.close()  # released with no reader stored: this server trains one
        # the children run at a lower priority than everything else: on a loaded machine (the other test worker, a
        # `make run` beside the suite) they get little of the cores, so the bound is generous
        status = _wait_for(server.url, lambda s: s["state"].startswith(("done", "failed")), timeout=1200)
        served = ("done: the reader is served", "done: its dev check did not choose it, so the reader before it")
        assert status["state"].startswith(served), status
        assert status["stages"] == [50, 60] and status["steps"] == 60
        assert status["last"]["state"] == "done" and status["last"]["steps"] == 60 and status["last"]["seconds"] > 0
        log = (home / LOG_FILE).read_text()
        assert log.count("dev queries the reader") == 2  # two trainings, each checked: the child's own report
        current, previous = load_reader(home / SPACE), load_reader(home / SPACE, READER_PREVIOUS)
        assert current is not None and previous is not None
        assert {current.extra["config"]["steps"], previous.extra["config"]["steps"]} == {50, 60}
        trained = status["last"]["trained"]
        assert trained["steps"] == 60 and (trained["sha256"] == current.sha256) == (
            current.extra["config"]["steps"] == 60
        )
        space = httpx.get(f"{server.url}/v1/space", timeout=30).json()
        assert space["reader"]["served"] is True and space["reader"]["sha256"] == current.sha256
        assert httpx.post(f"{server.url}/v1/query", json=query, timeout=30).json()["mode"] == "reader"
    finally:
        lock.close()
        stop_server(server)


def _store_reader(home: Path, seed: int, served: bool, kept: dict | None = None) -> str:
    """Store an untrained reader (its own `seed`) beside the space, as `prunecascade reader` does, and record a dev
    check of it with the verdict `served`. Returns its sha256."""
    encoder = EmbeddingIndex.load(home / SPACE).encoder
    spec = ReaderSpec(encoder=encoder.spec.to_dict(), d=8, dv=8, hidden=16, max_shift=6)
    torch.manual_seed(seed)
    digest = save_reader(
        build_ranker(spec, torch.randn(64, spec.input_dim), encoder).eval(), spec, home / SPACE, check=kept
    )
    path = home / CONFIG_FILE
    space = Space.load(home / SPACE).meta["id"]
    choice = ReaderChoice(served=served, sha256=digest, space=space, rule=READER_RULE)
    CascadeConfig.load(path).model_copy(update={"reader": choice}).save(path)
    return digest


def test_a_full_reader_its_check_does_not_choose_gives_way_to_the_first(tiny_home, tmp_path) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    first = _store_reader(home, seed=0, served=True)
    state = ServiceState(
        Settings(home=home, train_reader=True, reader_training_first_steps=50, reader_training_steps=60)
    )
    state.load()
    assert serves(state.snapshot) and state.snapshot.reader.sha256 == first
    kept = CascadeConfig.load(home / CONFIG_FILE).reader.model_dump(mode="json")
    _store_reader(home, seed=1, served=False, kept=kept)  # the full stage's reader, not chosen by its check
    training = ReaderTraining(state)
    training._adopt(final=True, served_before=True)
    assert serves(state.snapshot) and state.snapshot.reader.sha256 == first  # the first serves again
    assert training.status()["state"] == "done: its dev check did not choose it, so the reader before it serves again"
    _store_reader(home, seed=2, served=False)
    training._adopt(final=True, served_before=False)  # nothing served before it: nothing to go back to
    assert not serves(state.snapshot) and training.status()["state"] == "done: its dev check did not choose it"


def test_the_stages_left_to_train_follow_the_reader_stored() -> None:
    assert training_stages(4000, 16000) == (4000, 16000)
    assert training_stages(0, 16000) == training_stages(16000, 16000) == training_stages(20000, 16000) == (16000,)
    stages = (4000, 16000)
    assert stages_left(stages, None, None) == stages  # nothing stored: all of them
    assert stages_left(stages, None, {"steps": 4000, "sha256": "a"}) == stages  # its reader removed since
    assert stages_left(stages, "a", {"steps": 4000, "sha256": "a"}) == (16000,)  # a restart after the first
    assert stages_left(stages, "b", {"steps": 4000, "sha256": "a"}) == ()  # someone else's reader since
    assert stages_left(stages, "a", {"steps": 16000, "sha256": "a"}) == ()  # all done
    assert stages_left(stages, "a", None) == ()  # a reader this training never made
    assert stages_left((16000,), "a", {"steps": 4000, "sha256": "a"}) == ()  # a schedule changed since: not ours


def test_the_background_training_trains_the_recipes_steps() -> None:
    """`make run` trains what `prunecascade reader` trains by default: the recipe's steps, three quarters alone."""
    recipe = ReaderTrainConfig()
    assert Settings.model_fields["reader_training_steps"].default == recipe.steps
    assert recipe.alone_steps == recipe.steps * 3 // 4


def test_a_home_with_a_reader_trains_none(tiny_home, tmp_path) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    (home / SPACE / "reader.json").write_text("{}")  # any stored reader, even a broken one, is not retrained
    server = start_server(home, {"PRUNECASCADE_TRAIN_READER": "true"})
    try:
        status = _wait_for(server.url, lambda s: s["state"].startswith("not"), timeout=60)
        assert status["state"] == "not needed: a reader is stored" and status["last"] is None
        assert not (home / STATUS_FILE).exists()
    finally:
        stop_server(server)


@pytest.mark.parametrize("setting", ["false", None])
def test_without_the_setting_nothing_trains(tiny_home, tmp_path, setting) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    server = start_server(home, None if setting is None else {"PRUNECASCADE_TRAIN_READER": setting})
    try:
        assert _training(server.url) is None
        assert not (home / STATUS_FILE).exists()
    finally:
        stop_server(server)


def _serve_a_long_training(tiny_home: Path, tmp_path: Path) -> tuple[Path, Server, int]:
    """A copy of the tiny home served with a training too long to end by itself: the home, the server and the
    training child's pid, once it trains."""
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    env = {"PRUNECASCADE_TRAIN_READER": "true", "PRUNECASCADE_READER_TRAINING_STEPS": "1000000"}
    server = start_server(home, env)
    try:
        return home, server, _wait_for(server.url, lambda s: s["state"] == "training", timeout=60)["last"]["pid"]
    except BaseException:
        stop_server(server)
        raise


def test_stopping_the_server_ends_the_training_it_started(tiny_home, tmp_path) -> None:
    home, server, pid = _serve_a_long_training(tiny_home, tmp_path)
    try:
        assert _alive(pid) and json.loads((home / STATUS_FILE).read_text())["state"] == "training"
    finally:
        stop_server(server)
    assert server.process.returncode is not None
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    assert load_reader(home / SPACE) is None  # nothing half-trained was stored
    assert json.loads((home / STATUS_FILE).read_text())["state"] == "stopped with the server"


def test_a_failed_training_is_recorded_and_the_server_serves_on(tiny_home, tmp_path) -> None:
    home = tmp_path / "home"
    shutil.copytree(tiny_home, home)
    (home / "bootstrap.json").write_text("{broken")  # the child cannot tell which prototypes to train on
    example = QuerySet.load(home / SPACE).split("dev").x[0]
    query = {"target": {"examples": [np.asarray(example).tolist()]}, "k": 3}
    server = start_server(home, {"PRUNECASCADE_TRAIN_READER": "true", "PRUNECASCADE_READER_TRAINING_STEPS": "5"})
    try:
        status = _wait_for(server.url, lambda s: s["state"].startswith(("done", "failed")), timeout=120)
        assert status["state"].startswith("failed: exit code 2") and status["last"]["state"] == "failed"
        assert "prunecascade reader: error: Expecting property name" in (home / LOG_FILE).read_text()
        answer = httpx.post(f"{server.url}/v1/query", json=query, timeout=30)
        assert answer.status_code == 200 and answer.json()["mode"] != "reader"
        assert load_reader(home / SPACE) is None
    finally:
        stop_server(server)


def test_a_training_ended_by_a_signal_is_recorded_as_stopped_not_failed(tiny_home, tmp_path) -> None:
    """Ctrl-C in a terminal, or a script ending the server's process group, signals the child too."""
    _, server, pid = _serve_a_long_training(tiny_home, tmp_path)
    try:
        os.kill(pid, signal.SIGTERM)  # as the group's signal reaches it
        status = _wait_for(server.url, lambda s: s["state"] != "training", timeout=30)
        assert status["state"] == "stopped by signal 15" and status["last"]["state"] == "stopped by signal 15"
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    finally:
        stop_server(server)
