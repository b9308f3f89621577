"""Structured pruning by (weakly) submodular greedy selection with least-squares reweighting (paper 002;
the details below are this project's).

For a layer whose units feed the next layer as column groups of A (rows x columns) with targets
B = A W^T, F(S) = ||B||^2 - min_W' ||B - A_S W'||^2 is the energy of B captured by span(A_S). Greedy adds
the unit with the largest marginal gain. Everything is done in Gram space (G = A^T A, C = A^T B, float64):
adding a unit is one rank-`group` downdate of the residual Gram matrices (the projection of all columns onto
the orthogonal complement of span(A_S)), never a least-squares solve per candidate. The marginal gain of a
group u is tr(C_u^T G_uu^{-1} C_u) on the residuals.

Variants: layerwise (activations of the original network), sequential (activations of the partially pruned
network, targets from it too), asymmetric (inputs from the partially pruned network, targets from the
original network)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from models.networks import Classifier
from models.pruning.registry import Calibration, register_method
from models.pruning.surgery import LayerProblem, columns_of, layer_inputs, layer_problem, shrink_layer

__all__ = [
    "GreedyResult",
    "greedy_select",
    "naive_greedy_select",
    "reconstruction_objective",
    "problem_grams",
    "select_greedy_layer",
    "select_greedy_sequential",
    "select_greedy_asymmetric",
]


@dataclass(frozen=True)
class GreedyResult:
    """Units in the order greedy added them and the marginal gain of each step (unnormalised)."""

    order: torch.Tensor
    gains: torch.Tensor
    total: float

    def kept(self, k: int | None = None) -> torch.Tensor:
        return self.order[: len(self.order) if k is None else k].sort().values

    def normalised_objective(self) -> torch.Tensor:
        """F(S_k) / ||B||^2 for k = 1..len(order)."""
        return self.gains.cumsum(0) / max(self.total, 1e-300)


def problem_grams(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """G = A^T A, C = A^T B and ||B||^2, in float64."""
    A64, B64 = A.double(), B.double()
    return A64.T @ A64, A64.T @ B64, float(B64.pow(2).sum())


def greedy_select(G: torch.Tensor, C: torch.Tensor, k: int, group: int = 1, total: float = 0.0) -> GreedyResult:
    """Greedy max of F(S) over |S| <= k with rank-`group` downdates of the residual Gram matrices.

    Cost: O(k * columns * (columns + outputs) * group) instead of a least-squares solve per candidate."""
    Gr, Cr = G.double().clone(), C.double().clone()
    cols = Gr.shape[0]
    units = cols // group
    if units * group != cols or k > units:
        raise ValueError(f"{cols} columns do not form {units} groups of {group}, or k={k} > {units}")
    eye = torch.eye(group, dtype=torch.float64)
    block_scale = Gr.reshape(units, group, units, group).diagonal(dim1=0, dim2=2).diagonal(dim1=0, dim2=1)
    block_scale = block_scale.sum(1).clamp_min(1e-300)  # trace of each original diagonal block
    ridge = 1e-12 * float(Gr.diagonal().mean().clamp_min(1e-300))
    taken = torch.zeros(units, dtype=torch.bool)
    order, gains = [], []
    for _ in range(k):
        if group == 1:
            d = Gr.diagonal()
            gain = Cr.pow(2).sum(1) / (d + ridge)
            resid = d
        else:
            blocks = Gr.reshape(units, group, units, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            cb = Cr.reshape(units, group, -1)
            sol = torch.linalg.solve(blocks + ridge * eye, cb)
            gain = (cb * sol).sum((1, 2))
            resid = blocks.diagonal(dim1=1, dim2=2).sum(1)
        # Columns already (numerically) in span(A_S) have residual ~0: their ratio is noise, not gain.
        gain = torch.where(resid > 1e-10 * block_scale, gain, torch.zeros_like(gain))
        gain[taken] = -torch.inf
        u = int(torch.argmax(gain))
        order.append(u)
        gains.append(max(float(gain[u]), 0.0))
        taken[u] = True
        sel = columns_of(torch.tensor([u]), group)
        g_cols = Gr[:, sel]
        inv = torch.linalg.pinv(Gr[sel][:, sel] + ridge * eye, hermitian=True)
        Cr -= g_cols @ (inv @ Cr[sel])
        Gr -= g_cols @ (inv @ g_cols.T)
    return GreedyResult(torch.tensor(order, dtype=torch.long), torch.tensor(gains, dtype=torch.float64), total)


def reconstruction_objective(A: torch.Tensor, B: torch.Tensor, kept: torch.Tensor, group: int = 1) -> float:
    """Normalised F(S) = 1 - min_W' ||B - A_S W'||^2 / ||B||^2, by a plain least-squares solve (float64)."""
    A64, B64 = A.double(), B.double()
    A_s = A64[:, columns_of(torch.as_tensor(kept, dtype=torch.long), group)]
    sol = torch.linalg.lstsq(A_s, B64, driver="gelsd").solution
    return 1.0 - float((B64 - A_s @ sol).pow(2).sum()) / max(float(B64.pow(2).sum()), 1e-300)


def naive_greedy_select(A: torch.Tensor, B: torch.Tensor, k: int, group: int = 1) -> torch.Tensor:
    """Reference greedy: one least-squares solve per candidate per step. For tests only (slow)."""
    units = A.shape[1] // group
    chosen: list[int] = []
    for _ in range(k):
        best, best_f = -1, -torch.inf
        for u in range(units):
            if u in chosen:
                continue
            f = reconstruction_objective(A, B, torch.tensor([*chosen, u]), group)
            if f > best_f + 1e-12:
                best, best_f = u, f
        chosen.append(best)
    return torch.tensor(chosen, dtype=torch.long)


def _targets(problem: LayerProblem) -> torch.Tensor:
    return problem.A @ problem.W.T


def _greedy_on(problem: LayerProblem, k: int, targets: torch.Tensor | None = None) -> GreedyResult:
    G, C, total = problem_grams(problem.A, _targets(problem) if targets is None else targets)
    return greedy_select(G, C, k, problem.group, total)


@register_method("greedy-layer", kind="structured")
def select_greedy_layer(model: Classifier, calibration: Calibration, budgets: list[int]) -> list[torch.Tensor]:
    """Submodular greedy per layer on the original network's activations (pair with --reweight)."""
    inputs = layer_inputs(model, calibration.x.float())
    return [_greedy_on(layer_problem(model, i, inputs[i + 1]), k).kept() for i, k in enumerate(budgets)]


def _sequential(
    model: Classifier, calibration: Calibration, budgets: list[int], reweight: bool, asymmetric: bool
) -> Classifier:
    x = calibration.x.float()
    original = layer_inputs(model, x) if asymmetric else None
    current = copy.deepcopy(model).eval()
    for i, k in enumerate(budgets):
        problem = layer_problem(current, i, layer_inputs(current, x)[i + 1])
        if original is not None:
            target_problem = layer_problem(model, i, original[i + 1])
            targets = _targets(target_problem)
        else:
            targets = _targets(problem)
        kept = _greedy_on(problem, k, targets).kept()
        new_weight = None
        if reweight:
            new_weight = _least_squares(problem.A, targets, kept, problem.group)
        current = shrink_layer(current, i, kept, new_weight)
    return current


def _least_squares(A: torch.Tensor, B: torch.Tensor, kept: torch.Tensor, group: int) -> torch.Tensor:
    """argmin_W' ||B - A_S W'^T|| with a tiny ridge (rank-deficient A_S is common: dead ReLUs)."""
    A_s = A[:, columns_of(kept, group)].double()
    gram = A_s.T @ A_s
    gram += 1e-6 * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram, A_s.T @ B.double()).T


@register_method("greedy-sequential", kind="structured", builds_network=True)
def select_greedy_sequential(
    model: Classifier, calibration: Calibration, budgets: list[int], reweight: bool = True
) -> Classifier:
    """Submodular greedy layer by layer on the partially pruned network's own activations."""
    return _sequential(model, calibration, budgets, reweight, asymmetric=False)


@register_method("greedy-asymmetric", kind="structured", builds_network=True)
def select_greedy_asymmetric(
    model: Classifier, calibration: Calibration, budgets: list[int], reweight: bool = True
) -> Classifier:
    """Submodular greedy with pruned-network inputs and original-network targets."""
    return _sequential(model, calibration, budgets, reweight, asymmetric=True)
