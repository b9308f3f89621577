"""Pruning methods behind one interface: scores -> selection/masks -> apply -> register."""

from models.pruning.api import prune
from models.pruning.budgets import BUDGET_RULES, layer_budgets, uniform_budgets
from models.pruning.masks import apply_masks, select_masks, sparsity
from models.pruning.registry import Calibration, PruningMethod, get_method, list_methods, register_method
from models.pruning.surgery import shrink, shrink_layer

__all__ = [
    "BUDGET_RULES",
    "Calibration",
    "PruningMethod",
    "apply_masks",
    "get_method",
    "layer_budgets",
    "list_methods",
    "prune",
    "register_method",
    "select_masks",
    "shrink",
    "shrink_layer",
    "sparsity",
    "uniform_budgets",
]
