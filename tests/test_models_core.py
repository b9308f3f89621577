"""Specs, networks, data splits and FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.data import DatasetError, load_dataset
from models.flops import count_flops
from models.networks import build_network
from models.pruning import apply_masks, select_masks
from models.pruning.unstructured import score_magnitude
from models.spec import NetworkSpec

SPECS = [
    NetworkSpec("mlp", 40, 10, hidden=(32, 16)),
    NetworkSpec("cnn1d", 40, 10, hidden=(24,), channels=(4, 8)),
    NetworkSpec("cnn2d", 64, 10, hidden=(12,), channels=(4, 6), kernel_size=3),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_spec_round_trips_and_builds(spec: NetworkSpec) -> None:
    assert NetworkSpec.from_dict(spec.to_dict()) == spec
    net = build_network(spec)
    x = torch.randn(5, spec.input_dim)
    logits, h = net.forward_with_hidden(x)
    assert logits.shape == (5, spec.num_classes) and h.shape == (5, spec.hidden_dim)
    torch.testing.assert_close(net(x), logits)
    assert len(net.weight_layers()) == len(spec.widths) + 1


def test_spec_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="unknown spec keys"):
        NetworkSpec.from_dict({**SPECS[0].to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="square"):
        NetworkSpec("cnn2d", 40, 10, hidden=(8,), channels=(4,))
    with pytest.raises(ValueError, match="hidden"):
        NetworkSpec("mlp", 40, 10, hidden=())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_flops_match_torch_flop_counter(spec: NetworkSpec) -> None:
    net = build_network(spec).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, spec.input_dim))
    flops = count_flops(net, spec.input_dim)
    assert flops.dense_kernel == counter.get_total_flops()
    assert flops.nonzero == flops.dense_kernel


def test_nonzero_flops_count_only_kept_weights() -> None:
    net = build_network(SPECS[0])
    apply_masks(net, select_masks(score_magnitude(net), keep=0.25, scope="layer"))
    flops = count_flops(net, 40)
    # an MLP does one multiply-add per weight and item: nonzero FLOPs are 2 x kept weights
    kept = sum(int((layer.weight != 0).sum()) for layer in net.weight_layers())
    assert flops.nonzero == 2 * kept
    assert flops.nonzero < 0.3 * flops.dense_kernel


def test_digits_splits_are_disjoint_and_seeded() -> None:
    a = load_dataset("digits", seed=3)
    b = load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    np.testing.assert_array_equal(a.x_pool, b.x_pool)
    assert not np.array_equal(a.x_pool, c.x_pool)
    total = sum(len(s) for s in (a.x_train, a.x_val, a.x_test, a.x_pool))
    assert total == 1797 and a.num_classes == 10 and a.input_dim == 64
    rows = {r.tobytes() for r in a.x_train}
    assert sum(r.tobytes() in rows for r in a.x_pool) <= 5  # digits has a few exact duplicate images


def test_mnist1d_is_generated_locally(tmp_path) -> None:
    s = load_dataset("mnist1d", num_samples=1000, cache_dir=tmp_path)
    assert s.input_dim == 40 and s.num_classes == 10
    assert any(tmp_path.iterdir())  # cached for the next command
    again = load_dataset("mnist1d", num_samples=1000, cache_dir=tmp_path)
    np.testing.assert_array_equal(s.x_test, again.x_test)


def test_user_npz_with_clusters_and_clear_errors(tmp_path) -> None:
    x = np.random.default_rng(0).normal(size=(400, 6)).astype(np.float32)
    y = np.arange(400) % 4
    np.savez(tmp_path / "mine.npz", x=x, y=y, cluster=np.arange(400) // 5)
    s = load_dataset(str(tmp_path / "mine.npz"))
    assert s.cluster_pool is not None and len(s.cluster_pool) == len(s.x_pool)
    np.savez(tmp_path / "bad.npz", x=x)
    with pytest.raises(DatasetError, match="lacks arrays"):
        load_dataset(str(tmp_path / "bad.npz"))
    x[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    with pytest.raises(DatasetError, match="NaN"):
        load_dataset(str(tmp_path / "nan.npz"))
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")
