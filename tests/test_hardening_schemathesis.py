"""schemathesis against a real server, every operation, without and with the admin token: no server error
(5xx other than the documented 503/504) and every status documented in the OpenAPI document."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server, start_server, stop_server
from service_fixtures import TOKEN, admin_env, copy_home

pytest.importorskip("schemathesis")

MAX_EXAMPLES = int(os.environ.get("PRUNECASCADE_SCHEMATHESIS_EXAMPLES", "8"))
CHECKS = "not_a_server_error,status_code_conformance"


@pytest.fixture(scope="module")
def fuzzed(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = copy_home(tiny_home, tmp_path_factory.mktemp("schemathesis") / "home")
    s = start_server(home, admin_env(PRUNECASCADE_LOG_LEVEL="error"))
    yield s
    stop_server(s)


def _schemathesis(server: Server, token: str | None, out: Path) -> subprocess.CompletedProcess[str]:
    st = Path(sys.executable).with_name("st")
    command = [
        str(st),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "11",
        "--workers",
        "1",
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        "60",
        "--no-color",
        "--report",
        "junit",
        "--report-junit-path",
        str(out),
    ]
    if token is not None:
        command += ["--header", f"Authorization: Bearer {token}"]
    env = {**os.environ, "NO_COLOR": "1"}
    # cwd: schemathesis keeps a `.schemathesis/` cache in its working directory, which must not land in the tree
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_schemathesis_finds_no_server_error_and_no_undocumented_status(
    fuzzed: Server, token: str | None, tmp_path: Path
) -> None:
    result = _schemathesis(fuzzed, token, tmp_path / "junit.xml")
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail
    assert "No issues found" in result.stdout or "passed" in result.stdout.lower(), tail
    assert fuzzed.process.poll() is None  # the server is still up
