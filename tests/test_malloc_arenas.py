"""The cap on glibc's malloc arenas (service/malloc_arenas.py): threads that allocate at the same time share one
arena under the cap, and get arenas of their own without it. Counted by glibc's own `malloc_info`, in a fresh
interpreter each time (a process's arenas outlive its threads). And the supervisor's trim before it forks: freed heap
pages go back to the kernel, measured by the process's resident memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROGRAM = r"""
import ctypes, sys, tempfile, threading
from service.malloc_arenas import limit_arenas

capped = limit_arenas(int(sys.argv[1]))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
barrier = threading.Barrier(6)

def allocate():
    blocks = [libc.malloc(4096) for _ in range(64)]  # each thread allocates while the others hold theirs
    barrier.wait()
    for b in blocks:
        libc.free(b)
    barrier.wait()

threads = [threading.Thread(target=allocate) for _ in range(5)]
for t in threads:
    t.start()
barrier.wait()
with tempfile.NamedTemporaryFile(suffix=".xml") as out:
    fp = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    heaps = open(out.name).read().count("<heap nr=")
barrier.wait()
for t in threads:
    t.join()
print(capped, heaps)
"""


def _arenas(cap: int, **env: str) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(cap)], env=environ, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and malloc_info")
def test_threads_share_one_arena_under_the_cap_and_not_without() -> None:
    assert _arenas(1) == (True, 1)
    capped, heaps = _arenas(0)  # glibc's default: no cap set
    assert not capped and heaps > 1
    capped, heaps = _arenas(1, MALLOC_ARENA_MAX="4")  # the operator's own setting wins
    assert not capped and 1 < heaps <= 4


TRIM = r"""
import ctypes
from service.malloc_arenas import release_free_memory

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

blocks = [libc.malloc(16384) for _ in range(4096)]  # 64 MiB of heap, below the mmap threshold
for b in blocks:
    ctypes.memset(b, 1, 16384)  # touched: resident
pin = libc.malloc(64)  # keeps the freed chunks below the top of the heap, where free() alone never returns them
for b in blocks:
    libc.free(b)
freed = rss_mib()
released = release_free_memory()
print(released, freed - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_kernel() -> None:
    released, dropped_mib = subprocess.run(
        [sys.executable, "-c", TRIM], capture_output=True, text=True, check=True
    ).stdout.split()
    assert released == "True"
    assert float(dropped_mib) > 48  # of the 64 MiB freed and still resident before
