"""Train a dense model on a dataset and register it; default architectures per dataset."""

from __future__ import annotations

from typing import Any

import torch

from models.data import Splits
from models.evaluation import accuracy
from models.manifest import Manifest
from models.networks import build_network
from models.registry import ModelRegistry
from models.spec import NetworkKind, NetworkSpec
from models.training import TrainConfig, train_classifier

__all__ = ["default_spec", "train_and_register"]


def default_spec(splits: Splits, kind: NetworkKind) -> NetworkSpec:
    """Small LeNet-style CNNs and two-layer MLPs, sized for 2 CPU cores."""
    d, c = splits.input_dim, splits.num_classes
    if kind == "mlp":
        return NetworkSpec("mlp", d, c, hidden=(256, 256))
    if kind == "cnn1d":
        return NetworkSpec("cnn1d", d, c, hidden=(128,), channels=(32, 64))
    return NetworkSpec("cnn2d", d, c, hidden=(64,), channels=(16, 32), kernel_size=3)


def train_and_register(
    registry: ModelRegistry,
    name: str,
    spec: NetworkSpec,
    splits: Splits,
    config: TrainConfig = TrainConfig(),
    data_args: dict[str, Any] | None = None,
) -> Manifest:
    """`data_args` (seed, num_samples) are stored so that later commands rebuild the very same splits."""
    torch.manual_seed(config.seed)
    model = build_network(spec)
    report = train_classifier(
        model, splits.x_train, splits.y_train, splits.x_val, splits.y_val, config, f"train {name}"
    )
    return registry.register(
        name,
        model,
        accuracy=accuracy(model, splits.x_test, splits.y_test),
        dataset=splits.name,
        extra={
            "data_args": data_args or {},
            "epochs_run": report.epochs_run,
            "best_epoch": report.best_epoch,
            "val_accuracy": report.best_val_accuracy,
        },
    )
