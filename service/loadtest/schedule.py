"""Open-loop arrival schedules: send times are fixed before the run, so a slow server cannot slow the client
down and hide its queueing delay (latency is measured from the scheduled time, not the actual send)."""

from __future__ import annotations

import math

__all__ = ["open_loop_schedule"]


def open_loop_schedule(rate: float, duration: float, max_requests: int) -> list[float]:
    """Send offsets in seconds from the start, one every 1/rate, for `duration` seconds, at most `max_requests`.

    A constant rate (not Poisson) makes two runs of the same point send the same load."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    if not duration > 0 or not math.isfinite(duration):
        raise ValueError(f"duration must be a positive number of seconds, got {duration}")
    if max_requests < 0:
        raise ValueError(f"max_requests must be >= 0, got {max_requests}")
    # round() before floor(): 10/s for 0.3 s is 3 requests, not 2 because 0.3 * 10 == 2.9999999999999996
    count = min(math.floor(round(rate * duration, 9)), max_requests)
    return [i / rate for i in range(count)]
