"""Chunked serving forward pass: same outputs as one pass, chunk sized by the widest activation."""

from __future__ import annotations

import pytest
import torch

from models.inference import MIN_CHUNK_ROWS, chunk_rows, forward_chunked, widest_activation
from models.networks import build_network
from models.spec import NetworkSpec

SPECS = {
    "mlp": NetworkSpec("mlp", input_dim=40, num_classes=10, hidden=(64, 32)),
    "cnn1d": NetworkSpec("cnn1d", input_dim=40, num_classes=10, hidden=(13,), channels=(3, 6)),
    "cnn2d": NetworkSpec("cnn2d", input_dim=64, num_classes=10, hidden=(16,), channels=(4, 8), kernel_size=3),
}


@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("chunk", [1, 7, 50, None])
def test_chunked_forward_matches_one_pass(kind: str, chunk: int | None) -> None:
    torch.manual_seed(0)
    model = build_network(SPECS[kind]).eval()
    x = torch.randn(50, SPECS[kind].input_dim)
    with torch.inference_mode():
        logits, hidden = model.forward_with_hidden(x)
        got_logits, got_hidden = forward_chunked(model, x, chunk)
    assert got_logits.shape == logits.shape and got_hidden.shape == hidden.shape
    torch.testing.assert_close(got_logits, logits)
    torch.testing.assert_close(got_hidden, hidden)


def test_widest_activation_is_the_largest_conv_output() -> None:
    assert widest_activation(SPECS["cnn1d"]) == 3 * 40  # conv 1: 3 channels x 40 positions
    assert widest_activation(SPECS["cnn2d"]) == 4 * 64  # conv 1: 4 channels x 8 x 8
    assert widest_activation(SPECS["mlp"]) == 64


def test_chunk_rows_fills_the_budget_and_has_a_floor() -> None:
    assert chunk_rows(SPECS["cnn1d"], budget_bytes=4 * 120 * 1000) == 1000
    assert chunk_rows(SPECS["cnn1d"], budget_bytes=1) == MIN_CHUNK_ROWS
    wider = SPECS["cnn1d"].with_widths([30, 60, 13])
    assert chunk_rows(wider) < chunk_rows(SPECS["cnn1d"])
    with pytest.raises(ValueError, match="budget_bytes"):
        chunk_rows(SPECS["cnn1d"], budget_bytes=0)
