"""Plots people can read: no overlapping tick labels, no outlier setting the scale, legends beside the data."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from lab.run_tuples import (
    SWEET_SPOT_PNG,
    readable_limits,
    ri_vs_flops_figure,
    sparse_log_ticks,
    sweet_spot_figure,
    write_outputs,
)
from lab.tuples import ExperimentResult, ResultRow, SweetSpotRow

KEEPS = (1.0, 0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.05)  # crowded on a log axis: 0.2..0.5 is under half a decade
DENSE_FLOPS = 100_000


def _row(keep: float, aggregator: str, n: int) -> ResultRow:
    flops = int(DENSE_FLOPS * keep)
    acc = min(0.99, 0.5 + 0.1 * n * keep)
    return ResultRow(
        variant="dense" if keep == 1.0 else f"magnitude@{keep:g}",
        method="dense" if keep == 1.0 else "magnitude",
        keep=keep,
        accuracy=0.9,
        flops_item=flops,
        flops_item_dense_kernel=DENSE_FLOPS,
        aggregator=aggregator,
        n=n,
        flops_aggregator=10 * n,
        flops_tuple=n * flops + 10 * n,
        n_accuracy=acc,
        n_accuracy_low=acc - 0.02,
        n_accuracy_high=min(1.0, acc + 0.02),
        ri=acc - 0.3,
        ri_low=acc - 0.35,
        ri_high=acc - 0.25,
        tuples=200,
    )


def synthetic_result() -> ExperimentResult:
    budgets = [DENSE_FLOPS, 4 * DENSE_FLOPS]
    aggs = ["mean_prob", "bayes"]
    rows = [_row(k, a, n) for k, a, n in itertools.product(KEEPS, aggs, (1, 2, 4))]
    budget_rows = [_row(k, a, n) for k, a, n in itertools.product(KEEPS, aggs, range(1, 81))]
    spots = [
        SweetSpotRow(b, a, "magnitude@0.25", "magnitude", 0.25, 4, b, 0.9, 0.88, 0.92, 0.6, False)
        for b, a in itertools.product(budgets, aggs)
    ]
    return ExperimentResult(rows, budget_rows, spots, {"seed": 0})


def overlapping_labels(ax, renderer) -> list[tuple[str, str]]:
    """Pairs of visible x tick labels whose drawn boxes intersect."""
    labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def test_the_overlap_check_catches_a_default_log_axis() -> None:
    """The check below can fail: matplotlib's default log ticks on these keeps do collide."""
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    ax.plot([0.5, 0.25, 0.1, 0.05], [1, 2, 3, 4])  # the compression levels of docs/figures/aggregation_sweet_spot.png
    ax.set_xscale("log")
    fig.canvas.draw()
    assert overlapping_labels(ax, fig.canvas.get_renderer())
    plt.close(fig)


def test_sweet_spot_tick_labels_do_not_overlap_and_read_as_fractions() -> None:
    fig = sweet_spot_figure(synthetic_result())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert overlapping_labels(ax, renderer) == []
        texts = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert "0.05" in texts and "0.5" in texts and all("10^" not in t and "$" not in t for t in texts)
        assert ax.get_xlim()[0] > ax.get_xlim()[1]  # inverted: compression grows to the right
    assert fig.legends and len(fig.legends[0].get_texts()) == 2  # one entry per aggregator x method
    plt.close(fig)


@pytest.mark.parametrize(
    ("values", "kept"),
    [
        ([1.0, 0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.05], [1.0, 0.5, 0.3, 0.2, 0.1, 0.05]),
        ([0.5, 0.25, 0.1], [0.5, 0.25, 0.1]),
        ([0.1, 0.0, -1.0], [0.1]),
    ],
)
def test_sparse_log_ticks_drop_only_crowded_levels(values: list[float], kept: list[float]) -> None:
    assert sparse_log_ticks(values) == kept


def test_write_outputs_saves_the_sweet_spot_png(tmp_path: Path) -> None:
    write_outputs(synthetic_result(), tmp_path)
    png = tmp_path / SWEET_SPOT_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(png)
    assert image.shape[1] > image.shape[0] * 2  # one wide row of panels


def _outside_axes(fig, legend) -> bool:
    """True when the legend's drawn box meets no axes' drawn box (so no curve can run through it)."""
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    return not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


def result_with_an_ri_outlier(outlier: float = -70.0) -> ExperimentResult:
    """The synthetic result with one RI far below the rest, as one bayes cell measured."""
    result = synthetic_result()
    rows = list(result.rows)
    rows[5] = dataclasses.replace(rows[5], ri=outlier, ri_low=outlier - 1, ri_high=outlier + 1)
    return ExperimentResult(rows, result.budget_rows, result.sweet_spots, result.config)


def test_readable_limits_exclude_a_far_outlier_and_keep_ordinary_data_whole() -> None:
    lo, hi = readable_limits([0.1, 0.2, 0.3, 0.4, 0.5, -70.0])
    assert -2.0 < lo < 0.1 and 0.5 < hi < 2.0
    lo, hi = readable_limits([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lo < 0.1 and hi > 0.5


def bulk_fraction(ax, low: float, high: float) -> float:
    """The share of the axes' drawn height taken by the y range [low, high]."""
    to_px = ax.transData.transform
    span = abs(to_px((1.0, high))[1] - to_px((1.0, low))[1])
    return span / ax.get_window_extent().height


def test_the_flattening_check_catches_a_linear_axis_with_the_outlier() -> None:
    """The measure below can fail: on a plain axis down to -70 the ordinary RIs take under 2% of the height."""
    fig, ax = plt.subplots(figsize=(3.4, 4.0))
    ax.plot([1, 2, 3], [0.2, 0.69, -70.0])
    fig.canvas.draw()
    assert bulk_fraction(ax, 0.2, 0.69) < 0.02
    plt.close(fig)


def test_ri_figure_draws_the_outlier_at_its_value_without_flattening_the_rest() -> None:
    fig = ri_vs_flops_figure(result_with_an_ri_outlier())
    fig.canvas.draw()
    ys = [y for ax in fig.axes for line in ax.get_lines() for y in line.get_ydata()]
    assert -70.0 in ys  # drawn at its value, not clipped to an edge
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo < -70.0 and hi >= 0.69  # every point inside the axes
        assert bulk_fraction(ax, 0.2, 0.69) > 0.1  # the ordinary values keep a readable share of the height
    assert [t for ax in fig.axes for t in ax.texts] == []  # nothing written over the data
    assert fig.legends and all(_outside_axes(fig, lg) for lg in fig.legends)
    plt.close(fig)


def test_ri_figure_without_outliers_keeps_a_plain_linear_axis() -> None:
    fig = ri_vs_flops_figure(synthetic_result())
    assert all(ax.get_yscale() == "linear" for ax in fig.axes)
    assert [t for ax in fig.axes for t in ax.texts] == []
    plt.close(fig)


def test_sweet_spot_legend_sits_outside_the_axes() -> None:
    fig = sweet_spot_figure(synthetic_result())
    fig.canvas.draw()
    assert all(_outside_axes(fig, lg) for lg in fig.legends)
    plt.close(fig)


def _pruning_groups() -> tuple[dict, list[str], list[float]]:
    """Accuracy rows for every method the benchmark runs, two seeds, three kept fractions."""
    from lab.pruning_figure import curve_label, method_configs
    from models.pruning import list_methods

    kinds = {m.name: m.kind for m in list_methods()}
    keeps = [0.5, 0.25, 0.1]
    groups: dict = {}
    labels = []
    for i, (method, reweight, budget) in enumerate(method_configs([])):
        row = {"method": method, "reweight": reweight, "budget": budget, "kind": kinds[method]}
        labels.append(curve_label(row))
        for k in keeps:
            groups[("m", labels[-1], k)] = [
                {**row, "keep": k, "accuracy": 0.5 + 0.4 * k + 0.01 * i + 0.005 * s} for s in (0, 1)
            ]
    return groups, labels, keeps


def test_pruning_figure_tells_every_method_apart_with_legends_outside() -> None:
    from lab.pruning_figure import pruning_figure

    groups, labels, keeps = _pruning_groups()
    fig = pruning_figure(groups, "m", labels, keeps, dense_acc=0.95)
    fig.canvas.draw()
    assert len(fig.legends) == 2 and all(_outside_axes(fig, lg) for lg in fig.legends)
    for ax in fig.axes:  # within a panel, no two curves share both colour and marker
        looks = [(ln.get_color(), ln.get_marker(), ln.get_linestyle()) for ln in ax.get_lines() if ln.get_marker()]
        looks = [lk for lk in looks if lk[1] in "osD^vP*Xph"]  # the curves, not the error-bar caps
        assert len(looks) == len(set(looks))
    plt.close(fig)


def test_pruning_figure_says_which_seeds_it_shows() -> None:
    from lab.pruning_figure import pruning_figure

    groups, labels, keeps = _pruning_groups()
    seeded = {key: [{**r, "seed": s} for s, r in enumerate(rs)] for key, rs in groups.items()}
    fig = pruning_figure(seeded, "m", labels, keeps, dense_acc=0.95)
    assert fig.axes[0].get_ylabel().endswith("(mean ± std over seeds 0, 1)")
    plt.close(fig)
    one = {key: [{**rs[0], "seed": 0}] for key, rs in groups.items()}
    fig = pruning_figure(one, "m", labels, keeps, dense_acc=0.95)
    assert fig.axes[0].get_ylabel().endswith("(seed 0)")
    plt.close(fig)
