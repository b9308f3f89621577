"""Training is a function of the seed alone, whatever the caller's torch thread count."""

from __future__ import annotations

import numpy as np
import torch

from models.networks import build_network
from models.spec import NetworkSpec
from models.training import TrainConfig, deterministic_training, train_classifier


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(600, 40)).astype(np.float32)
    y = (x[:, :10].argmax(axis=1)).astype(np.int64)
    return x[:480], y[:480], x[480:], y[480:]


def _train_under(threads: int, kind: str) -> dict[str, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(3)
        spec = (
            NetworkSpec("cnn1d", 40, 10, hidden=(64,), channels=(16, 32))
            if kind == "cnn1d"
            else NetworkSpec("mlp", 40, 10, hidden=(256, 256))
        )
        model = build_network(spec)
        xt, yt, xv, yv = _data()
        train_classifier(model, xt, yt, xv, yv, TrainConfig(epochs=3, batch_size=64, seed=5, progress=False))
        assert torch.get_num_threads() == threads  # the caller's setting is restored
        return {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(before)


def test_weights_bit_identical_under_one_and_two_threads() -> None:
    for kind in ("cnn1d", "mlp"):
        one, two = _train_under(1, kind), _train_under(2, kind)
        assert one.keys() == two.keys()
        for name in one:
            assert torch.equal(one[name], two[name]), f"{kind}: {name} differs between 1 and 2 threads"


def test_context_restores_threads_and_flags() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    flag = torch.are_deterministic_algorithms_enabled()
    try:
        with deterministic_training():
            assert torch.get_num_threads() == 1
            assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == 2
        assert torch.are_deterministic_algorithms_enabled() == flag
    finally:
        torch.set_num_threads(before)
