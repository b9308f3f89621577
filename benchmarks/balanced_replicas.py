"""The compose stack's topology on one machine, for benchmarks: N one-worker servers behind nginx `least_conn`.

`prunecascade serve --workers N` pins every keep-alive connection to the worker that accepted it, so a request
waits for that worker even when another is idle (`benchmarks/queueing_bound.py` shows what that costs the
open-loop p99). The deployment in `deploy/` puts nginx in front of the replicas with `least_conn`: each request
goes to the upstream with the fewest requests in flight, one shared queue. This runs exactly that, with
`deploy/nginx.conf` itself (only the addresses, the pid and log files rewritten), so `bench_concurrency` can
measure it beside the other servers (`--server NAME,workers=2,FRONT=nginx`).

    python -m benchmarks.balanced_replicas --port 18950 --replicas 2 --replica-port 18960

The environment (home, space, settings) is passed to every replica. It runs until SIGTERM or SIGINT and then
stops the processes it started, by their own pids. Needs Debian's `nginx` on the PATH (not a test dependency).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["render_nginx_conf", "main"]

DEPLOY_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"


def render_nginx_conf(template: str, port: int, upstreams: list[int]) -> str:
    """`deploy/nginx.conf` listening on 127.0.0.1:`port`, its upstream servers replaced by loopback `upstreams`."""
    servers = re.findall(r"^\s*server\s+api-\d+:\d+[^;]*;\s*$", template, flags=re.M)
    if not servers:
        raise ValueError("no `server api-N:PORT` lines in the nginx template")
    options = servers[0].split(":", 1)[1].split(None, 1)
    extra = f" {options[1].rstrip().rstrip(';')}" if len(options) > 1 else ""
    lines = "\n".join(f"        server 127.0.0.1:{p}{extra};" for p in upstreams)
    conf = template.replace(servers[0], lines + "\n")
    for line in servers[1:]:
        conf = conf.replace(line, "")
    conf, listens = re.subn(r"listen\s+80;", f"listen 127.0.0.1:{port};", conf)
    if listens != 1:
        raise ValueError("expected exactly one `listen 80;` in the nginx template")
    return conf.replace("http {", "http {\n    access_log off;", 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="nginx's loopback port")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-port", type=int, required=True, help="first replica's port (then +1, +2, ...)")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="balanced-replicas-"))
    ports = [args.replica_port + i for i in range(args.replicas)]
    (work / "logs").mkdir()
    (work / "nginx.conf").write_text(render_nginx_conf(DEPLOY_CONF.read_text(), args.port, ports))
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    procs: list[subprocess.Popen] = []
    try:
        for port in ports:
            cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            procs.append(subprocess.Popen(cmd, stdout=sys.stdout, stderr=subprocess.STDOUT))
            time.sleep(0.05)  # distinct start times: bench_concurrency tells the replicas' /metrics apart by them
        globals_ = f"daemon off; pid {work / 'nginx.pid'}; error_log {work / 'logs' / 'error.log'} warn;"
        procs.append(subprocess.Popen([args.nginx, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", globals_]))
        while not stop.wait(0.5):
            if any(proc.poll() is not None for proc in procs):
                print("a replica or nginx exited; stopping", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
