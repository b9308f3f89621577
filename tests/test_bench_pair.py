"""`bench_pair run --split` measures every held-out query of the split it names, once: the split is taken by the
evaluation alone (taking it before it too left every fourth query for `test` and the test half for `all`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.bench_pair import run
from cascade.queries import QuerySet


@pytest.mark.parametrize("split", ["test", "dev", "all"])
def test_a_split_run_measures_all_of_its_queries(tiny_home: Path, split: str) -> None:
    shipped = QuerySet.load(tiny_home / "spaces" / "default")
    assert shipped is not None
    expected = len(shipped.split(split))
    assert expected > 0 and (split == "all" or expected < len(shipped))
    args = argparse.Namespace(
        home=tiny_home, space="default", queries=10_000, split=split, candidates=30, k=5,
        firsts="pair-s25", samples="1", keeps="12", last_samples="2", extra=None, threads=1,
    )  # fmt: skip
    rows = run(args)["rows"]
    assert {r["name"] for r in rows} >= {"faiss only", "oracle"}
    assert all(r["queries"] == expected for r in rows)
