"""lab/tuples_seeds.py re-derives the sweet spot from a real `lab.run_tuples` run, and recounts it dense-kernel."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aggregation_fixtures import digits_mlp

from lab import tuples_seeds
from models.registry import ModelRegistry


def _run_tuples(tmp_path: Path) -> Path:
    from lab import run_tuples as command

    registry = ModelRegistry(tmp_path / "registry")
    registry.register("dense", digits_mlp(), accuracy=0.5, dataset="digits", extra={"data_args": {"seed": 0}})
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    argv = ["tuples", "--home", str(tmp_path), "--source", "prune", "--methods", "magnitude", "--keeps", "0.3"]
    argv += ["--ns", "1,2", "--aggregators", "mean_logit,lstm", "--budgets", "0.5,1.2,3", "--tuples", "100"]
    argv += ["--gadget-steps", "30", "--gadget-n-max", "4", "--n-cap", "6", "--out", str(out), "--no-plots"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return out


def test_sweet_spot_matches_the_run_and_dense_kernel_counting_prices_masks_as_dense(tmp_path: Path, capsys) -> None:
    out = _run_tuples(tmp_path)
    capsys.readouterr()
    run = tuples_seeds.load_run(out)
    spots = json.loads((out / "results.json").read_text())["sweet_spots"]
    assert spots
    for sp in spots:
        best, missing = tuples_seeds.sweet_spot(run, sp["budget"], [sp["aggregator"]], dense_kernel=False)
        assert not missing and best is not None
        assert (best["variant"], best["n"], best["n_accuracy"]) == (sp["variant"], sp["n"], sp["n_accuracy"])
    masked = next(r for r in run.rows if r["method"] == "magnitude")
    assert masked["flops_item"] < masked["flops_item_dense_kernel"]
    for budget in run.budgets:
        best, _ = tuples_seeds.sweet_spot(run, budget, ["mean_logit"], dense_kernel=True)
        if best is not None:
            assert best["n"] * best["flops_item_dense_kernel"] + best["flops_aggregator"] <= budget
    # at 0.5 dense passes only the masked variant fits, and only when counted nonzero
    assert tuples_seeds.sweet_spot(run, run.budgets[0], ["mean_logit"], dense_kernel=True)[0] is None
    assert tuples_seeds.sweet_spot(run, run.budgets[0], ["mean_logit"], dense_kernel=False)[0] is not None
    assert tuples_seeds.main([str(out), "--family", "dense:1"]) == 0
    text = capsys.readouterr().out
    assert "dense-kernel" in text and "`dense:1`" in text
