"""How many CPUs this process may really use: its affinity mask, capped by its cgroup CPU quota (a container's
CPU limit). `os.cpu_count()` is the host's count and would overcommit a limited container."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["usable_cpus", "cgroup_cpu_limit"]


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (may be fractional), or None without a quota. cgroup v2: `cpu.max`
    holds "QUOTA PERIOD" or "max PERIOD"; v1: `cpu/cpu.cfs_quota_us` (-1 for none) and `cpu.cfs_period_us`."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            if quota == "max":
                return None
            return _ratio(quota, period or "100000")
        for v1 in (root / "cpu", root / "cpu,cpuacct", root):
            q, p = v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us"
            if q.is_file() and p.is_file():
                return _ratio(q.read_text().strip(), p.read_text().strip())
    except (OSError, ValueError):
        return None
    return None


def _ratio(quota: str, period: str) -> float | None:
    q, p = int(quota), int(period)
    return q / p if q > 0 and p > 0 else None


def usable_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """min(CPUs in the affinity mask, ceil(cgroup quota)), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux: no affinity API; fall back to the host's count
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)
