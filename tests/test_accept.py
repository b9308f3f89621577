"""Spreading connections over worker processes (`service/accept.py`): the loop accepts every connection (none
starves while it backs off), stops cleanly, and with `prunecascade serve --workers 2` a burst of keep-alive
connections lands on both workers."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import httpx

from service.accept import BalancedAcceptLoop, _connections
from service.loadtest.process_tree import children


def _serve_and_connect(connections: int) -> tuple[list[bytes], int]:
    """An echo server on a `BalancedAcceptLoop`; `connections` clients connect at once and each sends a line.
    Returns the echoes and the connections the server held at the end."""
    loop = BalancedAcceptLoop()
    held: list[int] = []

    async def main() -> list[bytes]:
        release = asyncio.Event()
        handlers: list[asyncio.Task] = []

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.append(asyncio.current_task())  # type: ignore[arg-type]
            writer.write(await reader.readline())
            await writer.drain()
            await release.wait()  # the connection stays open until every client has its echo
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def client(i: int) -> tuple[bytes, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"{i}\n".encode())
            return await reader.readline(), writer

        # bounded: a loop that stopped listening for good would otherwise hang here
        answers = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(connections))), 120)
        held.append(_connections(server))
        release.set()
        await asyncio.gather(*handlers)
        for _, w in answers:
            w.close()
        server.close()  # while the accept may be backing off: nothing is accepted after
        await server.wait_closed()
        return [a for a, _ in answers]

    try:
        return loop.run_until_complete(main()), held[0]
    finally:
        loop.close()


def test_the_balanced_loop_accepts_every_connection_of_a_burst() -> None:
    echoes, held = _serve_and_connect(40)
    assert sorted(echoes) == sorted(f"{i}\n".encode() for i in range(40))
    assert held == 40  # one process alone takes them all, one per wakeup


def _established_per_process(pids: list[int], port: int) -> list[int]:
    """Established TCP connections on local `port` held by each of `pids` (from /proc/net/tcp and the fds)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    counts = []
    for pid in pids:
        n = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                n += 1
        counts.append(n)
    return counts


def test_two_workers_share_a_burst_of_keep_alive_connections(tiny_home, tmp_path) -> None:
    """8 keep-alive connections opened at once (as a load balancer's pool or the load tester opens them): each
    worker holds at least 3 (with uvicorn's own loop this failed in 3 of 3 tries: the first worker awake takes
    most of a burst)."""
    from service_fixtures import copy_home, serve_with_workers

    home = copy_home(tiny_home, tmp_path / "home")
    with serve_with_workers(home, 2) as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        deadline, ready = time.monotonic() + 180, 0
        while time.monotonic() < deadline and ready < 40:  # both workers loaded (any may answer)
            try:
                ready = ready + 1 if httpx.get(f"{url}/readyz", timeout=10).status_code == 200 else 0
            except httpx.TransportError:
                ready = 0
                time.sleep(0.5)
        assert ready >= 40
        workers = children(proc.pid)
        gate = threading.Barrier(8)
        socks: list[socket.socket] = []
        lock = threading.Lock()

        def connect() -> None:
            gate.wait()
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            with lock:
                socks.append(s)

        threads = [threading.Thread(target=connect) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        try:
            held = sorted(_established_per_process(workers, port))  # the 2 forked workers
            assert len(held) == 2 and sum(held) == 8
            assert held[0] >= 3, held
        finally:
            for s in socks:
                s.close()
