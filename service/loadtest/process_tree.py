"""A process and the processes below it, read from /proc (Linux): a server's worker processes, their CPU."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["children", "descendants", "tree_cpu_seconds"]


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ...; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def _children_table() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            table.setdefault(int(fields[1]), []).append(int(entry))
    return table


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    return sorted(_children_table().get(pid, []))


def descendants(pid: int) -> list[int]:
    """`pid` first, then every process below it."""
    table = _children_table()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(table.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and every process below it, in seconds."""
    ticks = 0
    for p in descendants(pid):
        if (fields := _stat_fields(p)) is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")
