"""Small trained models and calibration batches shared by the pruning tests (cached per test session)."""

from __future__ import annotations

import copy
from functools import cache, lru_cache

import torch

from models.data import Splits, load_dataset
from models.networks import Classifier, build_network
from models.pruning import Calibration
from models.spec import NetworkSpec
from models.training import TrainConfig, train_classifier

__all__ = ["digits", "mnist1d_small", "trained", "calibration", "SPECS"]

torch.set_num_threads(1)

SPECS: dict[str, NetworkSpec] = {
    "mlp": NetworkSpec("mlp", 64, 10, hidden=(48, 32)),
    "cnn2d": NetworkSpec("cnn2d", 64, 10, hidden=(16,), channels=(6, 8), kernel_size=3),
    "cnn1d": NetworkSpec("cnn1d", 40, 10, hidden=(16,), channels=(6, 8), kernel_size=5),
}


@lru_cache(maxsize=1)
def digits() -> Splits:
    return load_dataset("digits", seed=0)


@lru_cache(maxsize=1)
def mnist1d_small() -> Splits:
    return load_dataset("mnist1d", seed=0, num_samples=4000)


def splits_for(kind: str) -> Splits:
    return mnist1d_small() if kind == "cnn1d" else digits()


@cache
def _trained(kind: str) -> Classifier:
    splits = splits_for(kind)
    torch.manual_seed(0)
    model = build_network(SPECS[kind])
    config = TrainConfig(epochs=15 if kind != "cnn1d" else 6, lr=1e-2, patience=15, seed=0, progress=False)
    train_classifier(model, splits.x_train, splits.y_train, splits.x_val, splits.y_val, config)
    return model.eval()


def trained(kind: str = "mlp") -> Classifier:
    """A fresh copy of a small network trained for a few seconds (tests may modify it)."""
    return copy.deepcopy(_trained(kind))


def calibration(kind: str = "mlp", size: int = 256, labels: bool = True) -> Calibration:
    splits = splits_for(kind)
    x = torch.as_tensor(splits.x_train[:size])
    y = torch.as_tensor(splits.y_train[:size]) if labels else None
    return Calibration(x=x, y=y)
