"""The learned aggregation gadgets: FLOPs, batching, training with the network frozen, registry storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from aggregation_fixtures import digits_mlp, digits_splits

from lab.metrics import n_accuracy
from lab.tuples import sample_tuples, train_gadget
from models.aggregation import MemberOutputs, aggregate, get_aggregator, log_prior_of
from models.gadget import GadgetSpec, build_gadget, pad_segments
from models.gadget_training import GadgetTrainConfig, hidden_of
from models.registry import GADGET_WEIGHTS_FILE, ModelRegistry, RegistryError


def test_lstm_flops_match_a_hand_count() -> None:
    spec = GadgetSpec("lstm", input_dim=8, num_classes=3, hidden_size=4)
    # per step 4 gates x (input matmul 2*8*4 = 64 + recurrent matmul 2*4*4 = 32) = 384; 5 steps = 1920; head 2*4*3
    assert spec.flops(5) == 1920 + 24
    assert build_gadget(spec).flops(1) == 384 + 24
    assert get_aggregator("lstm").flops(5, 3, build_gadget(spec)) == 1944


def test_lstm_flops_agree_with_the_parameter_count() -> None:
    """Every LSTM weight and head weight is one multiply-add per step: 2 x weights x steps (biases excluded)."""
    spec = GadgetSpec("lstm", input_dim=12, num_classes=10, hidden_size=7)
    g = build_gadget(spec)
    lstm_weights = sum(p.numel() for n, p in g.lstm.named_parameters() if n.startswith("weight_"))
    for n in (1, 3, 16):
        assert spec.flops(n) == 2 * lstm_weights * n + 2 * g.head.weight.numel()


def test_deepsets_flops_match_a_hand_count() -> None:
    spec = GadgetSpec("deepsets", input_dim=8, num_classes=3, hidden_size=4)
    assert spec.flops(5) == 5 * 8 + 2 * 8 * 4 + 2 * 4 * 3


def test_pad_segments_places_each_run_in_its_row() -> None:
    values = torch.arange(12.0).reshape(6, 2)
    padded = pad_segments(values, torch.tensor([1, 3, 2]))
    assert padded.shape == (3, 3, 2)
    torch.testing.assert_close(padded[1], values[1:4])
    torch.testing.assert_close(padded[2, :2], values[4:6])
    assert bool((padded[0, 1:] == 0).all())


@pytest.mark.parametrize("kind", ["lstm", "deepsets"])
def test_batched_gadget_matches_each_tuple_alone_and_folding_keeps_outputs(kind: str) -> None:
    torch.manual_seed(0)
    g = build_gadget(GadgetSpec(kind, 6, 4, 5)).eval()
    g.set_standardisation(torch.randn(6), torch.rand(6) + 0.5)
    hidden = torch.randn(10, 6)
    counts = torch.tensor([3, 1, 4, 2])
    with torch.no_grad():
        together = g(hidden, counts)
        start = 0
        for t, n in enumerate(counts.tolist()):
            torch.testing.assert_close(together[t : t + 1], g(hidden[start : start + n], torch.tensor([n])))
            start += n
        g.fold_standardisation()
        torch.testing.assert_close(g(hidden, counts), together, atol=1e-4, rtol=1e-4)


def _trained(kind: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    s = digits_splits()
    model = digits_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, h_train = hidden_of(model, s.x_train)
    _, h_val = hidden_of(model, s.x_val)
    spec = GadgetSpec(kind, h_train.shape[1], s.num_classes, 16)  # type: ignore[arg-type]
    config = GadgetTrainConfig(n_max=8, steps=250, batch_tuples=64, eval_every=50, val_tuples=200)
    prior = torch.as_tensor(s.prior)
    gadget = train_gadget(spec, h_train, torch.as_tensor(s.y_train), h_val, torch.as_tensor(s.y_val), prior, config)
    for k, v in model.state_dict().items():  # the network is frozen
        assert torch.equal(v, before[k])
    logits, hidden = hidden_of(model, s.x_test)
    return gadget, logits, hidden


@pytest.mark.parametrize("kind", ["lstm", "deepsets"])
def test_trained_gadget_beats_chance_clearly_and_returns_distributions(kind: str) -> None:
    gadget, logits, hidden = _trained(kind)
    s = digits_splits()
    prior = torch.as_tensor(s.prior)
    for n in (1, 4):
        batch = sample_tuples(s.y_test, prior, torch.full((300,), n), torch.Generator().manual_seed(n))
        post = aggregate(
            kind,
            MemberOutputs(logits[batch.index], hidden[batch.index]),
            batch.counts,
            log_prior_of(prior),
            gadget=gadget,
        )
        assert post.shape == (300, s.num_classes)
        assert bool(torch.isfinite(post).all())
        torch.testing.assert_close(post.exp().sum(1), torch.ones(300), atol=1e-5, rtol=0)
        assert n_accuracy(post, batch.labels).value > 0.5  # chance is about 0.1 on ten balanced classes


def test_gadget_is_stored_beside_its_variant_and_loaded_with_it(tmp_path: Path) -> None:
    s = digits_splits()
    registry = ModelRegistry(tmp_path)
    registry.register("tiny", digits_mlp(), accuracy=0.5, dataset="digits")
    assert registry.load("tiny").gadget is None
    torch.manual_seed(1)
    gadget = build_gadget(GadgetSpec("lstm", digits_mlp().spec.hidden_dim, s.num_classes, 8)).eval()
    meta = registry.save_gadget("tiny", 1, gadget, extra={"note": "test"})
    stored = json.loads((tmp_path / "tiny" / "1" / "gadget.json").read_text())
    assert stored["flops_per_n"]["4"] == gadget.flops(4) == meta["flops_per_n"]["4"]
    loaded = registry.load("tiny")
    assert loaded.gadget is not None and loaded.gadget.spec == gadget.spec
    logits, hidden = hidden_of(loaded.model, s.x_test[:9])
    counts = torch.tensor([2, 3, 4])
    lp = log_prior_of(torch.as_tensor(s.prior))
    via_registry = aggregate("lstm", MemberOutputs(logits, hidden), counts, lp, gadget=loaded.gadget)
    torch.testing.assert_close(via_registry, aggregate("lstm", MemberOutputs(logits, hidden), counts, lp, gadget))
    with pytest.raises(ValueError, match="deepsets gadget"):
        aggregate("deepsets", MemberOutputs(logits, hidden), counts, lp, gadget=loaded.gadget)
    (tmp_path / "tiny" / "1" / GADGET_WEIGHTS_FILE).write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="gadget"):
        registry.load("tiny")


def test_gadget_rejects_hidden_of_the_wrong_width() -> None:
    g = build_gadget(GadgetSpec("lstm", 5, 3, 4))
    with pytest.raises(ValueError, match="5-dim"):
        aggregate("lstm", MemberOutputs(torch.randn(4, 3), torch.randn(4, 6)), torch.tensor([4]), torch.zeros(3), g)
