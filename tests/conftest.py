"""Shared fixtures: a tiny embedded default (seconds to build) and a real uvicorn serving it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from cascade.bootstrap import bootstrap
from cascade.bootstrap_config import BootstrapConfig, PairConfig, PrunedPairVariant, PrunedVariant
from cascade.config import CONFIG_FILE, CascadeConfig, Stage
from cascade.snapshot import Snapshot, load_snapshot
from models.biencoder_training import BiEncoderTrainConfig
from models.pair_training import ListwiseConfig, PairTrainConfig
from models.prototypes import PrototypeConfig
from models.registry import ModelRegistry

torch.set_num_threads(1)

TINY_PAIR = PairConfig(
    space=PrototypeConfig(num_prototypes=150, views=6),
    train=PrototypeConfig(num_prototypes=300),
    queries=40,
    biencoder=BiEncoderTrainConfig(steps=150, batch_prototypes=64, eval_every=50),
    training=PairTrainConfig(steps=300, eval_every=100, val_pairs=500),
    listwise=ListwiseConfig(steps=150, queries=16, group=8, members=2, top=16, eval_every=50, val_queries=128),
    hidden=(64, 32),
    variants=(PrunedPairVariant("pair-s25", "greedy-asymmetric", 0.25, finetune_steps=50),),
    stages=(Stage(variant="pair-s25", samples=2, keep=20), Stage(variant="pair-dense", samples=6)),
)

TINY = BootstrapConfig(
    num_samples=6000,
    epochs=12,
    cluster_size=8,
    variants=(
        PrunedVariant("cnn-s50", "layer-weight-norm", 0.5, reweight=True),
        PrunedVariant("cnn-m20", "magnitude", 0.2),
    ),
    stages=(
        Stage(variant="cnn-s50", samples=2, keep=40, aggregator="bayes"),
        Stage(variant="dense", samples=8, aggregator="bayes"),
    ),
    pair=TINY_PAIR,
    tune=False,  # keeps the stages above as the default, so the cascade path is what tests exercise
)


# The slowest files (about a minute or more each on 2 cores), started first: `make test`'s workers take a file at
# a time in collection order (--no-loadscope-reorder), so a slow file collected last would leave one worker
# running it alone at the end.
SLOWEST_FIRST = (
    "test_readme_commands.py",
    "test_reader_training.py",
    "test_byod_pair.py",
    "test_first_run_serves_early.py",
    "test_tuner.py",
    "test_reader_serving.py",
    "test_bootstrap_record.py",
    "test_redis.py",
    "test_hardening_schemathesis.py",
    "test_fuzz.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    bootstrap(home, TINY, progress=False)
    return home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    url: str
    home: Path
    process: subprocess.Popen


def start_server(home: Path, env: dict[str, str] | None = None, timeout: float = 60.0) -> Server:
    """Real uvicorn in its own process on a free loopback port; returns once /readyz says ready."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--home", str(home), "--port", str(port)],
        env={**os.environ, "PRUNECASCADE_LOG_LEVEL": "warning", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return Server(url, home, proc)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(tiny_home: Path) -> Iterator[Server]:
    s = start_server(tiny_home)
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def snapshot(tiny_home: Path) -> Snapshot:
    return load_snapshot(
        ModelRegistry(tiny_home / "registry"),
        tiny_home / "spaces" / "default",
        CascadeConfig.load(tiny_home / CONFIG_FILE),
    )
