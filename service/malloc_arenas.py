"""glibc's malloc arenas, capped in the forked workers (`MALLOC_ARENAS`, default 1).

glibc gives each thread that allocates while another holds an arena an arena of its own, up to 8 per core, and
each keeps the freed buffers of the largest work its threads did. A worker computes its queries on the server's
pool threads, so with glibc's default it kept several queries' buffers at once. On 100,000 items a worker held to
one arena keeps about 50 MiB of its own after its warm-up queries instead of 65-72, and the server grows by 48-52
MiB per extra worker instead of 69-80 (9% of the item cache instead of 12-14%); in three runs queries by example
were as fast within the rounds' spread, label queries at one client 0.4-11% slower (docs/performance.md 0b, "One
malloc arena per worker"). `MALLOC_ARENAS=0` keeps glibc's default; an operator's own `MALLOC_ARENA_MAX` is left
as it is.

`release_free_memory` hands the pages of freed buffers back to the kernel (`malloc_trim`). The supervisor calls it
just before it forks: otherwise its heap still holds what reading the home and building the item tables freed, every
worker reuses those free chunks for its own allocations and so copies them page by page, and the supervisor keeps
the originals as well.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

__all__ = ["limit_arenas", "release_free_memory", "M_ARENA_MAX"]

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def _glibc(name: str, argtypes: tuple, restype: type) -> Callable[..., int] | None:
    """A function of the C library this interpreter runs on, typed; None where it has no such function."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def limit_arenas(arenas: int) -> bool:
    """Cap this process's malloc arenas (inherited by the processes it forks next). False where nothing was changed:
    `arenas` 0 (glibc's default), `MALLOC_ARENA_MAX` set by the operator, or a C library without glibc's `mallopt`."""
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = _glibc("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    return mallopt is not None and mallopt(M_ARENA_MAX, arenas) == 1


def release_free_memory() -> bool:
    """Return the free pages of this process's heap and arenas to the kernel (glibc's `malloc_trim(0)`). False where
    nothing was released, or the C library has no `malloc_trim`."""
    trim = _glibc("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    return trim is not None and trim(0) == 1
