"""Logs a person can read: probes at debug level (an orchestrator polls them every few seconds), one line per
bootstrap step, and no progress-bar escape codes in the log when it is not a terminal."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
from conftest import start_server
from service_fixtures import QUERY, copy_home


def _stop(server) -> list[dict]:
    server.process.terminate()
    try:
        _, err = server.process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        _, err = server.process.communicate()
    text = err.decode(errors="replace")
    assert "\x1b[" not in text and "\r" not in text  # no terminal control codes in a log that is not a terminal
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_probes_are_logged_at_debug_and_queries_at_info(tiny_home: Path, tmp_path: Path) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    server = start_server(home, {"PRUNECASCADE_LOG_LEVEL": "info"})
    try:
        for _ in range(3):
            assert httpx.get(f"{server.url}/healthz").status_code == 200
            assert httpx.get(f"{server.url}/readyz").status_code == 200
        assert httpx.post(f"{server.url}/v1/query", json=QUERY, timeout=30).status_code == 200
    finally:
        lines = _stop(server)
    access = [line for line in lines if line["logger"] == "prunecascade.access"]
    assert any("/v1/query" in line["msg"] for line in access), access
    assert not [line for line in access if "/healthz" in line["msg"] or "/readyz" in line["msg"]]


def test_probes_are_logged_at_debug_level(tiny_home: Path, tmp_path: Path) -> None:
    home = copy_home(tiny_home, tmp_path / "home")
    server = start_server(home, {"PRUNECASCADE_LOG_LEVEL": "debug"})
    try:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    finally:
        lines = _stop(server)
    probes = [line for line in lines if line["logger"] == "prunecascade.access" and "/healthz" in line["msg"]]
    assert probes and all(line["level"] == "debug" for line in probes), probes
