"""Load-test plots people can read, checked on the drawn artists of plots made from synthetic rows."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from loadtest_rows import CONFIGS, DENSE_FLOPS, row, synthetic_rows

from service.loadtest.evaluate import summarize_configs
from service.loadtest.plots import (
    LATENCY_PNG,
    MIN_P99_SAMPLES,
    QUALITY_PNG,
    Reference,
    config_points,
    latency_figure,
    plot_results,
    quality_figure,
)

EXACT = "exact"


def _points(rows):
    return config_points(rows, summarize_configs(rows, 0.01))


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


def test_masked_variants_cost_their_dense_kernel_flops_and_the_front_uses_them() -> None:
    points = {p.config: p for p in _points(synthetic_rows())}
    masked = points["cnn-m10/2/200 > dense/10"]
    assert masked.kernel_flops == pytest.approx(2.9e6)  # not its 0.4e6 nonzero FLOPs
    # cheapest by the FLOPs it actually runs, so on the front (it is dominated by the masked one on nonzero FLOPs)
    assert points["cnn-s25/2/100 > dense/10"].front
    assert not masked.front  # 2.9 MFLOPs for recall 0.88: beaten by 1.2 MFLOPs for 0.93
    assert [p.key for p in points.values()] == [str(i + 1) for i in range(len(CONFIGS))]


def test_quality_plot_labels_every_configuration_and_joins_only_the_front() -> None:
    rows = synthetic_rows()
    points = _points(rows)
    fig = quality_figure(points, [Reference("dense oracle", DENSE_FLOPS, agreement_at_k=1.0)], k=10)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    for p in points:
        assert p.key in labels  # each point carries its id...
        assert f"{p.key}  {p.config}" in fig.texts[0].get_text()  # ...and the key spells out the configuration
    joined = [ln for ln in ax.get_lines() if len(set(ln.get_xdata())) > 1]
    assert [ln.get_label() for ln in joined] == ["Pareto front (FLOPs vs recall)"]  # no other line joins points
    front = sorted((p for p in points if p.front), key=lambda p: p.kernel_flops)
    assert sorted(set(joined[0].get_xdata())) == [p.kernel_flops for p in front]
    assert any("sweet spot" in t.get_text() for t in ax.get_legend().get_texts())
    # the dense oracle: a reference point at its cost, agreement 1 by definition, named with its FLOPs
    assert any(t.startswith("dense oracle\n50.0 MFLOPs") for t in labels)
    assert any(list(ln.get_xdata()) == [DENSE_FLOPS, DENSE_FLOPS] for ln in ax.get_lines())
    plt.close(fig)


def test_an_exact_path_in_the_data_is_a_reference_not_a_cascade_point() -> None:
    rows = synthetic_rows() + [row(EXACT, rate, int(rate * 10), 2e4, 2e4, 0.97, 1.0, 1.0) for rate in (5.0, 20.0)]
    points = {p.config: p for p in _points(rows)}
    assert points[EXACT].reference and not points[EXACT].front  # it would dominate every cascade
    assert points["cnn-s25/2/100 > dense/10"].front
    fig = quality_figure(list(points.values()), [], k=10)
    ax = fig.axes[0]
    assert any(t.get_text() == f"{EXACT}\n20.0 kFLOPs" for t in ax.texts)
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"reference: recall@10", "reference: agreement@10"}
    plt.close(fig)


@pytest.mark.parametrize("seconds", [10.0, 40.0])
def test_every_percentile_has_its_sample_count_and_thin_p99s_say_so(seconds: float) -> None:
    rows = synthetic_rows(rates=(5.0, 20.0), seconds=seconds)
    rows[1].update(ok=int(rows[1]["ok"]) - 7, errors=7)  # one configuration lost answers at the first rate
    points = _points(rows)
    fig = latency_figure(rows, points)
    assert len(fig.axes) == 2  # one panel per rate
    for ax, rate in zip(fig.axes, (5.0, 20.0), strict=True):
        n = int(rate * seconds)
        assert f"n = {n} answers each" in ax.get_title()  # the usual count, once per panel
        expected = [p.key if not (rate == 5.0 and p.key == "2") else f"2 (n={n - 7})" for p in points]
        assert sorted(t.get_text() for t in ax.texts) == sorted(expected)  # the odd count beside its point
        hollow = [ln for ln in ax.get_lines() if ln.get_mfc() == "none"]
        assert len(hollow) == (len(points) if n < MIN_P99_SAMPLES else 0)  # hollow exactly when thin
        assert all(len(ln.get_xdata()) == 1 for ln in ax.get_lines())  # markers only: no line across configs
    note = fig.texts[-1].get_text()
    thin = any(int(r["ok"]) < MIN_P99_SAMPLES for r in rows)
    assert (f"fewer than {MIN_P99_SAMPLES} answers" in note) == thin
    plt.close(fig)


def test_plot_results_writes_both_pngs_with_room_for_the_key(tmp_path: Path) -> None:
    rows = synthetic_rows()
    files = plot_results(rows, summarize_configs(rows, 0.01), tmp_path)
    assert [f.name for f in files] == [LATENCY_PNG, QUALITY_PNG]
    for f in files:
        image = plt.imread(f)
        assert image.shape[0] > 500 and image.shape[1] > 900
        assert not math.isclose(float(image[..., :3].mean()), 1.0)  # something was drawn
