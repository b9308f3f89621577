"""Pruning methods by name. A method is one pure function; `prune()` does the rest of the pipeline.

- unstructured: `score(model, calibration) -> {param_name: scores}` (higher means keep);
  `select_masks` and `apply_masks` turn scores into zeroed weights.
- structured: `select(model, calibration, budgets) -> [kept unit indices per prunable layer]`;
  `shrink` rebuilds a physically smaller network, optionally least-squares reweighting the next layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from models.networks import Classifier

__all__ = ["Calibration", "PruningMethod", "register_method", "get_method", "list_methods", "METHODS"]

MethodKind = Literal["unstructured", "structured"]


@dataclass(frozen=True)
class Calibration:
    """The few samples a method may look at (the limited-data regime: at most a few hundred).
    `y` is None when the data is unlabelled; methods that need labels say so with `needs_labels`."""

    x: torch.Tensor
    y: torch.Tensor | None = None


@dataclass(frozen=True)
class PruningMethod:
    name: str
    kind: MethodKind
    fn: Callable[..., object]
    needs_data: bool
    needs_labels: bool
    summary: str
    wants_keep: bool = False
    builds_network: bool = False
    compensate: Callable[..., dict[str, torch.Tensor]] | None = None


METHODS: dict[str, PruningMethod] = {}


def register_method(
    name: str,
    *,
    kind: MethodKind,
    needs_data: bool = True,
    needs_labels: bool = False,
    wants_keep: bool = False,
    builds_network: bool = False,
    compensate: Callable[..., dict[str, torch.Tensor]] | None = None,
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Extensions of the base interface, all optional:
    - `wants_keep` (unstructured): the score function also receives `keep=` and `scope=` (iterative methods).
    - `builds_network` (structured): `select(model, calibration, budgets, reweight=)` returns the pruned
      network itself (methods that prune layer by layer on the partially pruned network).
    - `compensate` (unstructured): `compensate(model, calibration, masks) -> {bias name: shift}`, computed
      on the unpruned model and added to the biases after the masks are applied."""

    def decorate(fn: Callable[..., object]) -> Callable[..., object]:
        if name in METHODS:
            raise ValueError(f"pruning method {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = PruningMethod(
            name, kind, fn, needs_data, needs_labels, summary, wants_keep, builds_network, compensate
        )
        return fn

    return decorate


def get_method(name: str) -> PruningMethod:
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown pruning method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def list_methods() -> list[PruningMethod]:
    _load_builtin_methods()
    return [METHODS[k] for k in sorted(METHODS)]


def _load_builtin_methods() -> None:
    """Importing the method modules runs their decorators."""
    from models.pruning import elimination, greedy, structured, unstructured  # noqa: F401


ScoreFn = Callable[[Classifier, Calibration], dict[str, torch.Tensor]]
SelectFn = Callable[[Classifier, Calibration, list[int]], list[torch.Tensor]]
