"""Every command in README.md's code blocks works as written, so the next one that breaks fails CI.

The commands are read from the README itself and run by bash, unchanged but for three things a test must
substitute: `prunecascade` (and `.venv/bin/prunecascade`) run this checkout's CLI, `localhost:8000` is a real
uvicorn on a free port serving `./var`, and `/path/to/mine.npz` is a small file of the user's kind. `./var` is
the suite's tiny home with its pruned variants replaced by the default names (cnn-s25, cnn-s50, cnn-m10,
pair-s10, pair-s30), so that commands that name models find them. Only `make run` and `make test` are not run
here (`NOT_RUN` says why); a test checks that list against the README, so a new command is run or explicitly
excused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import TINY, TINY_PAIR, Server, free_port, start_server, stop_server

from cascade.bootstrap import bootstrap
from cascade.bootstrap_config import PrunedPairVariant, default_stages, default_variants
from cascade.bootstrap_record import RECORD_FILE
from cascade.config import CONFIG_FILE, Stage

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

NOT_RUN = {
    "make run": "the first run from a fresh clone, minutes long: timed by benchmarks/first_run.sh",
    "make test": "this suite itself (.ci/run calls it)",
}

# The default names on a tiny scale: what the README's commands refer to.
README_HOME = replace(
    TINY,
    variants=tuple(replace(v, finetune_epochs=0) for v in default_variants("cnn1d")),
    stages=default_stages("cnn1d"),
    pair=replace(
        TINY_PAIR,
        variants=(
            PrunedPairVariant("pair-s10", "greedy-asymmetric", 0.1, finetune_steps=50),
            PrunedPairVariant("pair-s30", "greedy-asymmetric", 0.3, finetune_steps=50),
        ),
        stages=(Stage(variant="pair-s10", samples=1, keep=20), Stage(variant="pair-dense", samples=6)),
    ),
)


def _strip_comment(line: str) -> str:
    """The line up to a `#` that starts a shell comment (outside quotes, after whitespace)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    """Every command of the README's ```sh blocks, in order: comments dropped, continuations joined."""
    commands: list[str] = []
    in_block = False
    pending = ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            in_block = raw.strip() == "```sh"
            continue
        if not in_block:
            continue
        line = _strip_comment(raw)
        if not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        commands.append((pending + line).strip())
        pending = ""
    return commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_home: Path) -> Path:
    """A checkout-like directory: `./var` (the tiny home), `.venv/bin/prunecascade` and `bin/prunecascade`
    running this checkout's CLI, and a user's `.npz` (no cluster column: the pair training that a cluster column
    starts is covered by tests/test_byod_pair.py, at a size a test can afford)."""
    root = tmp_path_factory.mktemp("readme")
    var = root / "var"
    shutil.copytree(tiny_home, var)  # its dense models, bi-encoder and space: only the default's names are missing
    for name in {v.name for v in TINY.variants} | {v.name for v in TINY_PAIR.variants}:
        shutil.rmtree(var / "registry" / name)  # TINY's cnn-s50 is pruned otherwise than the default's
    (var / CONFIG_FILE).unlink()
    (var / RECORD_FILE).unlink()
    bootstrap(var, README_HOME, progress=False)
    for where in (root / ".venv" / "bin", root / "bin"):
        where.mkdir(parents=True)
        shim = where / "prunecascade"
        shim.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -m service.cli "$@"\n')
        shim.chmod(0o755)
    rng = np.random.default_rng(0)
    labels = rng.choice([2, 7, 9], 600)
    x = rng.normal(size=(600, 12)) + labels[:, None]
    np.savez(root / "mine.npz", x=x.astype(np.float32), y=labels)
    return root


def _env(workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{workdir / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "PRUNECASCADE_LOG_LEVEL": "warning",
    }


@pytest.fixture(scope="module")
def var_server(workdir: Path) -> Iterator[Server]:
    s = start_server(workdir / "var")
    yield s
    stop_server(s)


def _substituted(command: str, workdir: Path, server: Server) -> str:
    return command.replace("localhost:8000", server.url.removeprefix("http://")).replace(
        "/path/to/mine.npz", str(workdir / "mine.npz")
    )


def _serve_until_ready(command: str, workdir: Path) -> None:
    """A `serve` command runs until stopped: it must become ready, then it is ended by its process group."""
    port = free_port()
    env = {**_env(workdir), "PRUNECASCADE_PORT": str(port)}
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{command!r} exited: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"{command!r} did not become ready")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_excused_commands_are_still_in_the_readme() -> None:
    commands = readme_commands(README.read_text())
    assert set(NOT_RUN) <= set(commands), "NOT_RUN names a command the README no longer has"
    assert [c for c in commands if c.startswith("make")] == list(NOT_RUN)  # any other make target is run or excused


def test_the_parser_reads_comments_continuations_and_quotes() -> None:
    text = "```sh\nprunecascade a --x '[{\"#\": 1}]'  # note\n    # more\nprunecascade b \\\n  --y 2\n```\n```\nno\n```"
    assert readme_commands(text) == ["prunecascade a --x '[{\"#\": 1}]'", "prunecascade b   --y 2"]


def test_every_readme_command_runs_as_written(workdir: Path, var_server: Server) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the README pipes into curl, which this machine lacks")
    commands = [c for c in readme_commands(README.read_text()) if c not in NOT_RUN]
    assert len(commands) >= 8
    for command in commands:
        command = _substituted(command, workdir, var_server)
        if command.split()[:2] == ["prunecascade", "serve"]:
            _serve_until_ready(command, workdir)
            continue
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=workdir,
            env=_env(workdir),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"{command!r} failed:\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), f"{command!r} printed nothing"
        if "curl" in command:  # curl -s exits 0 on any HTTP status: the answer must be a query's
            assert "clusters" in json.loads(done.stdout), done.stdout[:500]
        if command.startswith(("prunecascade prune", "prunecascade gadget")):
            assert done.stdout.strip().splitlines()[-1].startswith("verdict: "), done.stdout[-500:]
