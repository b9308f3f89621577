"""End to end: the load tester against real uvicorn serving a tiny bootstrapped home, a few seconds at a low
rate; the CSV must have the contract's columns, every request must succeed and the numbers must be sane. Queries
by example run against the shared tiny home with pair models (conftest's `server`)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import httpx
import pytest
from conftest import Server
from loadtest_fixtures import LiveService, loadtest_home_fixture, loadtest_service_fixture  # noqa: F401

from cascade.engine import ORACLE_AGGREGATOR
from service.commands import loadtest as loadtest_command
from service.loadtest.evaluate import CSV_COLUMNS


def _run(service: LiveService, out: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    loadtest_command.register(parser.add_subparsers())
    args = parser.parse_args(
        ["loadtest", "--url", service.url, "--home", str(service.home), "--out", str(out), "--quiet", *extra]
    )
    return int(args.func(args))


def test_loadtest_against_a_live_service(loadtest_service: LiveService, tmp_path: Path) -> None:
    grid = ["--variants", "cnn-m10/dense", "--samples", "1,2/4", "--keep", "20/-", "--with-default"]
    code = _run(loadtest_service, tmp_path, "--rates", "4", "--duration", "2", "--k", "5", *grid)
    assert code == 0
    with (tmp_path / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames is not None
        assert {"p50_ms", "p99_ms", "flops", "recall_at_k", "agreement_at_k"} <= set(reader.fieldnames)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert [r["config"] for r in rows] == ["cnn-m10/1/20 > dense/4", "cnn-m10/2/20 > dense/4", "default", "exact"]
    exact = rows[-1]  # the table of dense cluster posteriors: the oracle's answers at a lookup's cost
    assert float(exact["agreement_at_k"]) == 1.0 and float(exact["flops"]) < float(rows[0]["flops"])
    for r in rows:
        assert (r["sent"], r["ok"], r["errors"]) == ("8", "8", "0"), r["first_error"]
        assert 0.0 < float(r["p50_ms"]) <= float(r["p99_ms"])
        assert 0.0 < float(r["flops"]) < float(r["dense_flops"])
        assert 0.0 <= float(r["recall_at_k"]) <= 1.0
        assert 0.0 <= float(r["agreement_at_k"]) <= 1.0
    # the cheaper first stage (1 sample) must cost fewer FLOPs than the 2-sample one
    assert float(rows[0]["flops"]) < float(rows[1]["flops"])
    assert sum(r["sweet_spot"] == "True" for r in rows) == 1
    assert "sweet spot:" in (tmp_path / "summary.txt").read_text()
    for png in ("latency_vs_flops.png", "recall_vs_flops.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_through_the_service_agrees_with_itself(loadtest_service: LiveService, tmp_path: Path) -> None:
    """A grid whose only stage is the dense model on every member, aggregated as the oracle aggregates, is the
    oracle: agreement@k must be 1."""
    grid = ["--variants", "dense", "--samples", "8", "--aggregators", ORACLE_AGGREGATOR, "--no-exact"]
    code = _run(loadtest_service, tmp_path, "--rates", "3", "--duration", "1", *grid)
    assert code == 0
    with (tmp_path / "results.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["errors"] == "0"
    assert float(row["agreement_at_k"]) == 1.0


def test_loadtest_sends_the_held_out_queries_by_example(server: Server, tmp_path: Path) -> None:
    """The main path: the shipped held-out queries by example through the default pair cascade, with their
    recall@k (the query's own cluster in the top k), recomputed here from the same requests."""
    live = LiveService(server.url, server.home)
    code = _run(live, tmp_path, "--rates", "4", "--duration", "2", "--k", "5", "--no-exact")
    assert code == 0
    with (tmp_path / "results.csv").open() as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["default", "examples"]
    row = rows["examples"]
    assert (row["sent"], row["ok"], row["errors"]) == ("8", "8", "0"), row["first_error"]
    assert row["agreement_at_k"] == "" and row["sweet_spot"] == "False"  # no oracle; not on the label front
    held = httpx.get(f"{server.url}/v1/space/queries", params={"limit": 8}).json()["queries"]
    hits = []
    for i, q in enumerate(held):
        body = {"target": {"examples": [q["x"]]}, "k": 5, "mode": "cascade", "seed": i}
        answer = httpx.post(f"{server.url}/v1/query", json=body).json()
        assert [s["variant"] for s in answer["stages"]][-1] == "pair-dense"  # the pair cascade answered
        hits.append(q["cluster_id"] in [c["cluster_id"] for c in answer["clusters"]])
    assert float(row["recall_at_k"]) == pytest.approx(sum(hits) / len(hits))
    summary = (tmp_path / "summary.txt").read_text()
    assert "examples: 40 held-out queries by example" in summary and "own cluster in the top 5" in summary
