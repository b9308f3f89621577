"""The open-loop driver against an in-process fake service (httpx.MockTransport): latency is counted from the
scheduled send, errors are counted, the summary row is computed from the answers."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from typing import Any

import httpx
import pytest

from service.commands import loadtest as loadtest_command
from service.loadtest.evaluate import CSV_COLUMNS, summarize_point
from service.loadtest.runner import Outcome, PointRun, run_open_loop
from service.loadtest.schedule import open_loop_schedule

SERVICE_S = 0.05


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    label = body["target"]["label"]
    return {"clusters": [{"cluster_id": label}, {"cluster_id": 100 + label}], "flops": 1000, "latency_ms": 1.0}


async def _run(rate: float, count: int, in_flight: int, fail_odd: bool = False) -> PointRun:
    lock = asyncio.Lock()

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        async with lock:  # one request at a time, like a single saturated worker
            await asyncio.sleep(SERVICE_S)
        if fail_odd and body["seed"] % 2:
            return httpx.Response(500, text="boom")
        return httpx.Response(200, json=_answer(body))

    offsets = open_loop_schedule(rate, count / rate, count)

    def make(i: int) -> tuple[str, dict[str, Any]]:
        return "/v1/query", {"target": {"label": i % 3}, "k": 2, "seed": i}

    done: list[Outcome] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test") as client:
        return await run_open_loop(client, offsets, make, timeout=30.0, max_in_flight=in_flight, on_done=done.append)


def test_latency_includes_queueing_behind_a_saturated_server() -> None:
    """Sent at 100/s to a server doing 20/s: request i cannot finish before (i+1) service times after the
    start, so its latency from its scheduled time is at least (i+1)*0.05 - i*0.01. A closed-loop or
    send-time measurement would report about 0.05 s for every request."""
    run = asyncio.run(_run(rate=100, count=10, in_flight=1))
    assert [o.index for o in run.outcomes] == list(range(10))
    assert all(o.ok and o.status == 200 for o in run.outcomes)
    for o in run.outcomes:
        assert o.latency_s >= (o.index + 1) * SERVICE_S - o.scheduled_s - 0.005
    assert run.outcomes[-1].latency_s > 4 * SERVICE_S


def test_errors_are_counted_and_kept_out_of_latency_and_quality() -> None:
    run = asyncio.run(_run(rate=200, count=6, in_flight=6, fail_odd=True))
    assert [o.ok for o in run.outcomes] == [True, False, True, False, True, False]
    assert run.outcomes[1].status == 500 and "boom" in (run.outcomes[1].error or "")
    relevant = {0: {0}, 1: {1, 101}, 2: {2, 55}}
    oracle = {0: [0, 7], 1: [1, 101], 2: [55, 2]}
    row = summarize_point("cfg", 200.0, 0.03, 2, run, lambda i: i % 3, relevant, oracle)
    assert set(row) == set(CSV_COLUMNS)
    assert (row["sent"], row["ok"], row["errors"]) == (6, 3, 3)
    assert row["error_rate"] == 0.5
    # ok answers are i = 0, 2, 4 -> labels 0, 2, 1; each returns [label, 100 + label]
    # recall: label 0 -> 1/min(2,1) = 1; label 2 -> {2} hit of {2,55} -> 1/2; label 1 -> 2/2
    assert row["recall_at_k"] == pytest.approx((1 + 0.5 + 1) / 3)
    # agreement: label 0 -> {0} of {0,7} = .5; label 2 -> {2} of {55,2} = .5; label 1 -> 1
    assert row["agreement_at_k"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert row["flops"] == 1000
    assert math.isnan(row["flops_vs_dense"])  # the fake sends no dense_flops
    assert row["first_error"].startswith("HTTP 500")


def test_no_request_outlives_its_deadline() -> None:
    async def go() -> PointRun:
        async def handler(request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(5)
            return httpx.Response(200, json={})

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test") as client:
            return await run_open_loop(client, [0.0, 0.01], lambda i: ("/", {}), timeout=0.1)

    run = asyncio.run(go())
    assert all(not o.ok and o.status is None and "timeout" in (o.error or "") for o in run.outcomes)


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loadtest_command.register(parser.add_subparsers())
    return parser.parse_args(["loadtest", "--out", "/nonexistent", *extra])


def test_cli_refuses_a_remote_url_without_allow_remote() -> None:
    with pytest.raises(ValueError, match="allow-remote"):
        loadtest_command.build_plan(_args("--url", "http://192.0.2.1:8000"))
    plan = loadtest_command.build_plan(_args("--url", "http://192.0.2.1:8000", "--allow-remote"))
    assert plan.url == "http://192.0.2.1:8000"


def test_cli_builds_the_grid_and_refuses_runs_over_the_request_budget() -> None:
    plan = loadtest_command.build_plan(
        _args("--url", "http://127.0.0.1:1", "--variants", "a,b/dense", "--keep", "20/-", "--with-default")
    )
    assert [name for name, _ in plan.configs] == [
        "a/4/20 > dense/4",
        "b/4/20 > dense/4",
        "default",
        "exact",
        "examples",
    ]
    no_exact = loadtest_command.build_plan(_args("--url", "http://127.0.0.1:1", "--no-exact"))
    assert [name for name, _ in no_exact.configs] == ["default", "examples"]
    assert plan.rates == (5.0, 10.0, 20.0)
    with pytest.raises(ValueError, match="max-requests"):
        loadtest_command.build_plan(_args("--url", "http://127.0.0.1:1", "--rates", "100", "--max-requests", "50"))
    with pytest.raises(ValueError, match="max-seconds"):
        loadtest_command.build_plan(_args("--url", "http://127.0.0.1:1", "--duration", "60", "--max-seconds", "100"))
