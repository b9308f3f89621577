"""Prune a registered model and register the result with its FLOPs, accuracy and output deviation."""

from __future__ import annotations

import torch

from models.data import Splits
from models.evaluation import accuracy, output_deviation
from models.manifest import Manifest
from models.networks import Classifier
from models.pruning.api import prune
from models.pruning.budgets import BudgetRule
from models.pruning.masks import Scope
from models.pruning.registry import Calibration, get_method
from models.registry import ModelRegistry
from models.training import TrainConfig, train_classifier

__all__ = ["calibration_from", "prune_and_register"]


def calibration_from(splits: Splits, size: int = 512, seed: int = 0) -> Calibration:
    """`size` training items drawn by seed (the limited-data regime of the papers: at most 512)."""
    idx = torch.randperm(len(splits.x_train), generator=torch.Generator().manual_seed(seed))[:size]
    return Calibration(x=torch.as_tensor(splits.x_train[idx]), y=torch.as_tensor(splits.y_train[idx]))


def prune_and_register(
    registry: ModelRegistry,
    parent: str,
    method: str,
    keep: float,
    new_name: str,
    splits: Splits,
    *,
    scope: Scope = "global",
    reweight: bool = False,
    budget: BudgetRule = "uniform",
    finetune_epochs: int = 0,
    calibration_size: int = 512,
    seed: int = 0,
    activate: bool = True,
    progress: bool = False,
) -> Manifest:
    """`parent` is a model name (its active version) or `name:version`."""
    name, _, version = parent.partition(":")
    dense = registry.load(name, int(version) if version else None)
    if not isinstance(dense.model, Classifier):  # pair models are pruned on (q, x) pairs, not on items
        raise ValueError(
            f"{dense.manifest.ref} is a pair model; prune it with models.pruning.pair.prune_pair_and_register"
        )
    needs_calibration = get_method(method).needs_data or reweight or budget != "uniform"
    calibration = calibration_from(splits, calibration_size, seed) if needs_calibration else None
    torch.manual_seed(seed)
    pruned = prune(dense.model, method, keep, calibration, scope=scope, reweight=reweight, budget=budget)
    if finetune_epochs > 0:
        config = TrainConfig(epochs=finetune_epochs, patience=finetune_epochs, seed=seed, progress=progress)
        train_classifier(
            pruned, splits.x_train, splits.y_train, splits.x_val, splits.y_val, config, f"finetune {new_name}"
        )
    return registry.register(
        new_name,
        pruned,
        accuracy=accuracy(pruned, splits.x_test, splits.y_test),
        parent=dense.manifest.ref,
        method=method,
        keep=keep,
        dataset=dense.manifest.dataset,
        output_deviation=output_deviation(pruned, dense.model, splits.x_test),
        extra={
            "scope": scope,
            "reweight": reweight,
            "budget": budget,
            "finetune_epochs": finetune_epochs,
            "calibration_size": calibration_size if calibration is not None else 0,
            "seed": seed,
        },
        activate=activate,
    )
