"""The load tester behind `prunecascade loadtest`: a pure core (schedule, Pareto front; the metrics are
`cascade.ranking_metrics`) and an open-loop asyncio/httpx driver. It talks to the service over HTTP only and
imports nothing else from `cascade` except through the command that loads the space's labels."""

from service.loadtest.grid import StageSpec, expand_grid
from service.loadtest.pareto import pareto_front, sweet_spot
from service.loadtest.schedule import open_loop_schedule
from service.loadtest.target import check_target, is_loopback_url

__all__ = [
    "StageSpec",
    "expand_grid",
    "pareto_front",
    "sweet_spot",
    "open_loop_schedule",
    "check_target",
    "is_loopback_url",
]
