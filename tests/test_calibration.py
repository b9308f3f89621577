"""Temperature scaling and the expected calibration error, on synthetic logits whose true temperature is known."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.calibration import calibration_report, expected_calibration_error, fit_temperature


def _drawn(temperature: float, n: int = 20_000, grades: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model that is over-confident by `temperature`: labels are drawn from softmax(logits / T)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, grades, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / temperature, 1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_fit_recovers_the_temperature_the_labels_were_drawn_with(true_t: float) -> None:
    logits, labels = _drawn(true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.08)


def test_ece_is_zero_for_a_calibrated_model_and_falls_after_scaling() -> None:
    logits, labels = _drawn(3.0)
    calibrated = expected_calibration_error(torch.softmax(logits / 3.0, 1), labels)
    overconfident = expected_calibration_error(torch.softmax(logits, 1), labels)
    assert calibrated < 0.02 < 0.1 < overconfident
    report = calibration_report(logits, labels, fit_temperature(logits, labels))
    assert report["ece_after"] < report["ece_before"] and report["nll_after"] < report["nll_before"]
    assert report["pairs"] == len(labels)


def test_ece_by_hand() -> None:
    # two bins used of 10: confidences 0.95 (right) and 0.95 (wrong) -> |0.5 - 0.95|; 0.55 (right) -> |1 - 0.55|
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55]])
    grades = torch.tensor([0, 1, 1])
    assert expected_calibration_error(probs, grades, bins=10) == pytest.approx(2 / 3 * 0.45 + 1 / 3 * 0.45)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="probs must be"):
        expected_calibration_error(torch.zeros(2, 3), torch.zeros(3))


def test_a_pair_model_five_times_too_sure_gets_five_times_the_temperature(tiny_home: Path) -> None:
    """Scaling every logit by 5 (the scorer's last layer and the retriever's residual) must scale the fitted
    temperature by 5 on the same candidate lists, and leave the ECE after scaling where it was."""
    import copy

    from conftest import TINY

    from models.pair_calibration import calibrate_pair
    from models.prototypes import make_prototype_set
    from models.registry import ModelRegistry

    model = ModelRegistry(tiny_home / "registry").load("pair-dense").model
    assert TINY.pair is not None
    val = make_prototype_set(replace(TINY.pair.train, num_prototypes=60), "val")
    report = calibrate_pair(model, val, queries=128)
    assert report is not None and 0.05 < report["temperature"] < 20
    sure = copy.deepcopy(model)
    last = [m for m in sure.scorer.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        for layer in (last, sure.residual):
            layer.weight.mul_(5)
            layer.bias.mul_(5)
    scaled = calibrate_pair(sure, val, queries=128)
    assert scaled is not None
    assert scaled["temperature"] == pytest.approx(5 * report["temperature"], rel=1e-3)
    assert scaled["ece_after"] == pytest.approx(report["ece_after"], abs=1e-3)
    assert scaled["ece_before"] >= report["ece_before"]  # five times as sure is no better calibrated


def test_the_bootstrap_keeps_each_pair_models_calibration_in_its_registry_entry(tiny_home: Path) -> None:
    from models.registry import ModelRegistry

    registry = ModelRegistry(tiny_home / "registry")
    pair_models = [m for m in registry.active_manifests() if m.spec.get("kind") == "pair"]
    assert len(pair_models) >= 2  # the dense pair model and its pruned variants
    for manifest in pair_models:
        report = manifest.extra["posterior_calibration"]
        assert 0.05 <= report["temperature"] <= 20 and report["pairs"] > 0, manifest.name
        assert 0 <= report["ece_after"] <= 1 and 0 <= report["ece_before"] <= 1


def test_the_snapshot_serves_the_registered_temperature_and_ignores_a_broken_one(tiny_home: Path) -> None:
    from cascade.config import CONFIG_FILE, CascadeConfig
    from cascade.snapshot import load_snapshot, served_temperature
    from models.registry import ModelRegistry

    registry = ModelRegistry(tiny_home / "registry")
    snapshot = load_snapshot(registry, tiny_home / "spaces" / "default", CascadeConfig.load(tiny_home / CONFIG_FILE))
    variant = snapshot.variants["pair-dense"]
    expected = variant.manifest.extra["posterior_calibration"]["temperature"]
    assert variant.model.temperature == expected != 1.0
    # the logits it serves are the uncalibrated ones divided by T
    q, x = torch.randn(1, variant.model.spec.input_dim), torch.randn(4, variant.model.spec.input_dim)
    calibrated = variant.model.score(q, x)[0]
    variant.model.temperature = 1.0
    try:
        assert torch.allclose(calibrated * expected, variant.model.score(q, x)[0], atol=1e-5)
    finally:
        variant.model.temperature = expected
    for broken in ("hot", -1.0, 0.0, 1e9, True):
        extra = {**variant.manifest.extra, "posterior_calibration": {"temperature": broken}}
        assert served_temperature(variant.manifest.model_copy(update={"extra": extra})) == 1.0
    assert served_temperature(variant.manifest.model_copy(update={"extra": {}})) == 1.0
