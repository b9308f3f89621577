"""Plots people can read: no overlapping tick labels on the tuple experiment's sweet-spot figure."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from lab.run_tuples import SWEET_SPOT_PNG, sparse_log_ticks, sweet_spot_figure, write_outputs
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
