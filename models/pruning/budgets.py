"""How many units each prunable layer keeps for a target kept fraction.

- `uniform`: the same fraction of every layer.
- `equal-error` (project definition): every layer gets the same normalised reconstruction error
  1 - F_l(S_l) / ||A_l W_l||^2 of the layerwise greedy selection (`models.pruning.greedy`), at the smallest common
  error whose network costs no more FLOPs than the uniform budgets. Layers whose outputs are easy to
  reconstruct give units to the ones that are hard to reconstruct, at the same cost.
"""

from __future__ import annotations

from typing import Literal

import torch

from models.flops import count_flops
from models.networks import Classifier, build_network

__all__ = ["BudgetRule", "BUDGET_RULES", "uniform_budgets", "equal_error_budgets", "layer_budgets"]

BudgetRule = Literal["uniform", "equal-error"]
BUDGET_RULES: tuple[str, ...] = ("uniform", "equal-error")


def uniform_budgets(widths: list[int], keep: float) -> list[int]:
    """The same fraction of every layer, at least one unit each."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return [max(1, round(keep * w)) for w in widths]


def _flops(model: Classifier, widths: list[int]) -> int:
    return count_flops(build_network(model.spec.with_widths(widths)), model.spec.input_dim).dense_kernel


def equal_error_budgets(model: Classifier, calibration_x: torch.Tensor, keep: float) -> list[int]:
    """Smallest common layer error whose widths fit the FLOPs of the uniform budgets (bisection on the error)."""
    from models.pruning.greedy import greedy_select, problem_grams
    from models.pruning.surgery import layer_inputs, layer_problem

    widths = model.spec.widths
    target = _flops(model, uniform_budgets(widths, keep))
    inputs = layer_inputs(model, calibration_x.float())
    errors = []  # errors[l][k-1] = normalised error keeping k greedy units of layer l
    for i, w in enumerate(widths):
        problem = layer_problem(model, i, inputs[i + 1])
        G, C, total = problem_grams(problem.A, problem.A @ problem.W.T)
        errors.append(1.0 - greedy_select(G, C, w, problem.group, total).normalised_objective())

    def widths_at(tau: float) -> list[int]:
        return [int((e <= tau).nonzero()[0]) + 1 if bool((e <= tau).any()) else len(e) for e in errors]

    candidates = torch.cat(errors).unique().sort().values
    lo, hi = 0, len(candidates) - 1
    if _flops(model, widths_at(float(candidates[hi]))) > target:
        return uniform_budgets(widths, keep)
    while lo < hi:  # smallest error level whose FLOPs fit the target
        mid = (lo + hi) // 2
        if _flops(model, widths_at(float(candidates[mid]))) <= target:
            hi = mid
        else:
            lo = mid + 1
    return widths_at(float(candidates[lo]))


def layer_budgets(
    model: Classifier, keep: float, rule: BudgetRule = "uniform", calibration_x: torch.Tensor | None = None
) -> list[int]:
    """Units kept per prunable layer under `rule`."""
    if rule == "uniform":
        return uniform_budgets(model.spec.widths, keep)
    if rule == "equal-error":
        if calibration_x is None:
            raise ValueError("the equal-error budget rule needs calibration data")
        return equal_error_budgets(model, calibration_x, keep)
    raise ValueError(f"unknown budget rule {rule!r}; known: {', '.join(BUDGET_RULES)}")
