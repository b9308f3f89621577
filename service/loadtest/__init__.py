"""The load tester behind `prunecascade loadtest`: a pure core (schedule, grid; the metrics, Pareto front and
sweet spot are `cascade.ranking_metrics`) and an open-loop asyncio/httpx driver. It talks to the service over
HTTP only and imports nothing else from `cascade` except through the command that loads the space's labels."""

from service.loadtest.grid import StageSpec, expand_grid
from service.loadtest.schedule import open_loop_schedule
from service.loadtest.target import check_target, is_loopback_url

__all__ = [
    "StageSpec",
    "expand_grid",
    "open_loop_schedule",
    "check_target",
    "is_loopback_url",
]
