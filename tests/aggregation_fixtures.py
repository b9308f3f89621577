"""Shared fixtures of the aggregation tests: scikit-learn digits and a small MLP trained on them once."""

from __future__ import annotations

from functools import lru_cache

import torch

from models.data import Splits, load_dataset
from models.networks import Classifier, build_network
from models.spec import NetworkSpec
from models.training import TrainConfig, train_classifier

__all__ = ["digits_splits", "digits_mlp"]


@lru_cache(maxsize=1)
def digits_splits() -> Splits:
    return load_dataset("digits", seed=0)


@lru_cache(maxsize=1)
def digits_mlp() -> Classifier:
    """A deliberately small network (hidden width 16) so that aggregation has errors left to fix."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    s = digits_splits()
    model = build_network(NetworkSpec("mlp", s.input_dim, s.num_classes, hidden=(16,)))
    config = TrainConfig(epochs=15, patience=15, seed=0, progress=False)
    train_classifier(model, s.x_train, s.y_train, s.x_val, s.y_val, config)
    return model.eval()
