"""Fixtures of the load-test end-to-end test: its own tiny home (seconds to build) and a real uvicorn process
on a free loopback port, so the test does not depend on anyone else's fixtures."""

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

from cascade.bootstrap import bootstrap
from cascade.bootstrap_config import BootstrapConfig, PrunedVariant
from cascade.config import Stage

__all__ = ["LOADTEST_TINY", "LiveService", "loadtest_home_fixture", "loadtest_service_fixture"]

LOADTEST_TINY = BootstrapConfig(
    num_samples=4000,
    epochs=3,
    cluster_size=8,
    variants=(PrunedVariant("cnn-m10", "magnitude", 0.1),),
    stages=(Stage(variant="cnn-m10", samples=2, keep=20), Stage(variant="dense", samples=4)),
    pair=None,  # classifier-only: the load tester's grid is over classifier cascades
)


@dataclass(frozen=True)
class LiveService:
    url: str
    home: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", name="loadtest_home")
def loadtest_home_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("loadtest_home")
    bootstrap(home, LOADTEST_TINY, progress=False)
    return home


@pytest.fixture(scope="module", name="loadtest_service")
def loadtest_service_fixture(loadtest_home: Path) -> Iterator[LiveService]:
    """`uvicorn service.app:create_app --factory`, configured through the PRUNECASCADE_* environment."""
    port = _free_port()
    log = (loadtest_home / "uvicorn.log").open("w")
    env = {**os.environ, "PRUNECASCADE_HOME": str(loadtest_home), "PRUNECASCADE_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1"]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60.0
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited: {(loadtest_home / 'uvicorn.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not become ready within 60 s")
            time.sleep(0.2)
        yield LiveService(url, loadtest_home)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
