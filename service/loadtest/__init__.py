"""The load tester behind `prunecascade loadtest`: a pure core (schedule, metrics, Pareto front) and an
open-loop asyncio/httpx driver. It talks to the service over HTTP only and imports nothing from `cascade`
except through the command that loads the space's labels."""

from service.loadtest.grid import StageSpec, expand_grid
from service.loadtest.metrics import agreement_at_k, percentile, recall_at_k, relevant_clusters
from service.loadtest.pareto import pareto_front, sweet_spot
from service.loadtest.schedule import open_loop_schedule
from service.loadtest.target import check_target, is_loopback_url

__all__ = [
    "StageSpec",
    "expand_grid",
    "agreement_at_k",
    "percentile",
    "recall_at_k",
    "relevant_clusters",
    "pareto_front",
    "sweet_spot",
    "open_loop_schedule",
    "check_target",
    "is_loopback_url",
]
