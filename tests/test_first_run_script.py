"""benchmarks/first_run.sh ends only what it started: the `make run` it launched and everything under it, by
process group; never another process, even one whose command line looks like a server (`pkill -f` would hit
it on a shared host). Here `make` is a stand-in that serves /readyz and starts a child, so the script runs in
seconds; it then fails at the first query (the stand-in builds no .venv), which is when its trap must clean up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]

FAKE_SERVER = """
import http.server, os, sys
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PRUNECASCADE_PORT"])), Ready).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended


def test_first_run_ends_its_own_processes_and_no_other(tmp_path: Path) -> None:
    bin_dir, pids = tmp_path / "bin", tmp_path / "pids"
    bin_dir.mkdir()
    (tmp_path / "server.py").write_text(FAKE_SERVER)
    make = bin_dir / "make"
    make.write_text(
        textwrap.dedent(f"""\
            #!/usr/bin/env bash
            "{sys.executable}" "{tmp_path / "server.py"}" &
            echo $! >> "{pids}"
            sleep 600 &
            echo $! >> "{pids}"
            wait
            """)
    )
    make.chmod(0o755)
    # a bystander that `pkill -f "serve --bootstrap"` would match
    bystander = subprocess.Popen(["bash", "-c", "exec -a 'prunecascade serve --bootstrap' sleep 600"])
    try:
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
        done = subprocess.run(
            ["bash", str(ROOT / "benchmarks" / "first_run.sh"), str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "ready after" in done.stdout, done.stdout + done.stderr
        started = [int(p) for p in pids.read_text().split()]
        assert len(started) == 2
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in started if _alive(p)], "the script left processes it started running"
        assert bystander.poll() is None, "the script ended a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()
