"""A whole load test: check the target, fetch the oracle's answers once, sweep configurations x rates in
open loop within the request and time budgets, and write the CSV, plots and summary."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cascade.ranking_metrics import relevant_items
from service.loadtest.evaluate import ConfigSummary, summarize_configs, summarize_point
from service.loadtest.grid import StageSpec, stages_payload
from service.loadtest.report import CSV_FILE, SUMMARY_FILE, summary_text, write_csv
from service.loadtest.runner import Outcome, run_open_loop
from service.loadtest.schedule import open_loop_schedule

EXACT = "exact"  # the configuration name of the exact path (`mode: exact`)
EXAMPLES = "examples"  # the shipped held-out queries by example through the default pair cascade (the main path)
FRONT = "front"  # prefix of the tuned front's plans, replayed with the same queries by example

__all__ = ["EXACT", "EXAMPLES", "FRONT", "ExamplePlan", "Plan", "Result", "planned_requests", "run_loadtest"]

QUERY_PATH = "/v1/query"


@dataclass(frozen=True)
class ExamplePlan:
    """A plan of the tuned front (GET /v1/cascade, pair_tuning.front) as a query by example names it: stage 0's
    M and the stages ([] is FAISS alone)."""

    candidates: int
    stages: tuple[StageSpec, ...]


Config = tuple[str, tuple[StageSpec, ...] | ExamplePlan | None]
"""A configuration's name and what its queries send: stages of label queries, a front plan, or None (the default)."""


@dataclass(frozen=True)
class Plan:
    url: str
    rates: tuple[float, ...]
    duration: float
    k: int
    configs: tuple[Config, ...]  # None: the service's default cascade
    labels: tuple[int, ...] | None = None  # None: every class, cycled
    timeout: float = 10.0
    max_in_flight: int = 256
    max_requests: int = 20_000  # over the whole run, checked before anything is sent
    max_seconds: float = 1800.0  # no new point starts after this
    ready_wait: float = 30.0
    tolerance: float = 0.01
    plots: bool = True
    front: bool = False  # also replay every plan of the tuned front with the queries by example


@dataclass(frozen=True)
class Result:
    rows: list[dict[str, Any]]
    summaries: list[ConfigSummary]
    files: list[Path]
    summary: str
    skipped_points: int


def planned_requests(plan: Plan) -> int:
    """Requests the plan sends; raises ValueError when that is over plan.max_requests or the send windows
    alone are longer than plan.max_seconds, before anything is sent."""
    per_config = sum(len(open_loop_schedule(r, plan.duration, plan.max_requests + 1)) for r in plan.rates)
    total = per_config * len(plan.configs)
    if total > plan.max_requests:
        raise ValueError(f"the run would send {total} requests, more than --max-requests {plan.max_requests}")
    seconds = plan.duration * len(plan.rates) * len(plan.configs)
    if seconds > plan.max_seconds:
        raise ValueError(f"the run would take at least {seconds:g}s, more than --max-seconds {plan.max_seconds:g}")
    return total


async def _get_json(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    r = await client.get(path)
    r.raise_for_status()
    return r.json()


async def _wait_ready(client: httpx.AsyncClient, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    last = "no answer"
    while True:
        try:
            r = await client.get("/readyz")
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise RuntimeError(f"service not ready after {seconds:g}s ({last})")
        await asyncio.sleep(0.5)


async def _wait_exact(client: httpx.AsyncClient, seconds: float) -> None:
    """The exact path answers 503 while its table builds (in the background after start-up): wait for it."""
    deadline = time.monotonic() + seconds
    while True:
        state = (await _get_json(client, "/v1/space")).get("exact", {}).get("state")
        if state == "ready":
            return
        if state in ("disabled", "failed") or time.monotonic() >= deadline:
            raise RuntimeError(f"the exact table is {state!r}: run without the exact configuration (--no-exact)")
        await asyncio.sleep(0.5)


def _by_example(name: str) -> bool:
    """Configurations whose queries are the shipped queries by example (recall = the own cluster in the top k)."""
    return name == EXAMPLES or name.startswith(FRONT + " ")


async def _front_configs(client: httpx.AsyncClient) -> tuple[Config, ...]:
    """The tuned front's plans, cheapest first, each a configuration named `front M<candidates>: <stages>`."""
    tuning = (await _get_json(client, "/v1/cascade")).get("pair_tuning")
    if not tuning:
        return ()
    configs: list[Config] = []
    for point in sorted(tuning["front"], key=lambda p: p["flops"]):
        stages = tuple(
            StageSpec(s["variant"], int(s["samples"]), s.get("keep"), s.get("aggregator", "bayes"))
            for s in point["stages"]
        )
        configs.append((f"{FRONT} {point['name']}", ExamplePlan(int(point["candidates"]), stages)))
    return tuple(configs)


async def _held_out_queries(client: httpx.AsyncClient) -> list[tuple[list[float], int]]:
    """Every held-out query by example the space ships (GET /v1/space/queries, page by page): its vector and
    the id of its own cluster."""
    queries: list[tuple[list[float], int]] = []
    while True:
        page = await _get_json(client, f"/v1/space/queries?offset={len(queries)}&limit=1000")
        queries += [(q["x"], int(q["cluster_id"])) for q in page["queries"]]
        if not page["queries"] or len(queries) >= int(page["total"]):
            return queries


async def _oracle(
    client: httpx.AsyncClient, labels: Sequence[int], k: int, samples: int, timeout: float
) -> dict[int, list[int]]:
    """The dense exhaustive oracle's top-k, fetched once per label (it is deterministic: it samples nothing):
    one dense stage over every member, aggregated as the engine's oracle aggregates."""
    from cascade.engine import ORACLE_AGGREGATOR

    stages = [{"variant": "dense", "samples": samples, "aggregator": ORACLE_AGGREGATOR}]
    answers: dict[int, list[int]] = {}
    for label in labels:
        body = {"target": {"label": label}, "k": k, "stages": stages, "seed": 0}
        r = await client.post(QUERY_PATH, json=body, timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"oracle query for label {label} failed: HTTP {r.status_code} {r.text[:200]}")
        answers[label] = [int(c["cluster_id"]) for c in r.json()["clusters"]]
    return answers


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", leave=True, disable=not enabled)


async def _run(plan: Plan, cluster_labels: np.ndarray, out: Path, progress: bool, log: Callable[[str], None]) -> Result:
    total = planned_requests(plan)
    limits = httpx.Limits(max_connections=plan.max_in_flight, max_keepalive_connections=plan.max_in_flight)
    async with httpx.AsyncClient(base_url=plan.url, limits=limits, timeout=plan.timeout, trust_env=False) as client:
        await _wait_ready(client, plan.ready_wait)
        info = await _get_json(client, "/v1/space")
        if int(info["num_clusters"]) != len(cluster_labels):
            raise ValueError(
                f"the service has {info['num_clusters']} clusters but the local space has {len(cluster_labels)}:"
                " pass the --space-dir the service serves, or recall@k would be meaningless"
            )
        labels = plan.labels if plan.labels is not None else tuple(range(int(info["num_classes"])))
        if list(info.get("classes", labels)) != list(range(int(info["num_classes"]))):
            raise ValueError("the load tester scores recall on spaces whose labels are 0..C-1 and ids are positions")
        relevant = {label: relevant_items(cluster_labels, label) for label in labels}
        log(f"fetching the dense oracle's top-{plan.k} for {len(labels)} labels")
        oracle = await _oracle(client, labels, plan.k, int(info["max_cluster_size"]), max(plan.timeout, 120.0))
        if any(name == EXACT for name, _ in plan.configs):
            await _wait_exact(client, plan.ready_wait)
        configs = plan.configs
        if plan.front:
            front = await _front_configs(client)
            log(f"the tuned front: {len(front)} plans" if front else "no tuned front (GET /v1/cascade): not replayed")
            configs += front
            total = planned_requests(replace(plan, configs=configs))  # the budget holds with the front added
        examples: list[tuple[list[float], int]] = []
        if any(_by_example(name) for name, _ in configs):
            examples = await _held_out_queries(client)
            if examples:
                log(f"{len(examples)} held-out queries by example, cycled; recall@{plan.k}: own cluster in the top k")
            else:
                log("the space ships no held-out queries by example (no pair models): skipping the examples runs")
                configs = tuple(c for c in configs if not _by_example(c[0]))
        log(f"{len(configs)} configurations x {len(plan.rates)} rates, {total} requests planned")

        rows: list[dict[str, Any]] = []
        started = time.monotonic()
        skipped = 0
        for name, stages in configs:
            for rate in plan.rates:
                if time.monotonic() - started > plan.max_seconds:
                    skipped += 1
                    continue
                offsets = open_loop_schedule(rate, plan.duration, plan.max_requests)
                base: dict[str, Any] = {"k": plan.k}
                if name == EXACT:
                    base["mode"] = "exact"  # the table of dense cluster posteriors: what a cascade must beat
                elif isinstance(stages, ExamplePlan):  # a front plan: its M and stages ([] = FAISS alone)
                    base["candidates"] = stages.candidates
                    base["stages"] = stages_payload(stages.stages)
                elif stages is not None:
                    base["stages"] = stages_payload(stages)
                else:
                    base["mode"] = "cascade"  # the default cascade, even once the exact table is ready

                def make(i: int, base: dict[str, Any] = base, name: str = name) -> tuple[str, dict[str, Any]]:
                    if _by_example(name):  # the default pair cascade (mode cascade, no stages named) or a front plan
                        return QUERY_PATH, {**base, "target": {"examples": [examples[i % len(examples)][0]]}, "seed": i}
                    return QUERY_PATH, {**base, "target": {"label": labels[i % len(labels)]}, "seed": i}

                bar = _progress_bar(len(offsets), f"{name} @ {rate:g}/s", progress)
                errors = 0

                def done(o: Outcome, bar: Any = bar) -> None:
                    nonlocal errors
                    errors += 0 if o.ok else 1
                    bar.update()
                    if not o.ok:
                        bar.set_postfix_str(f"errors {errors}")

                run = await run_open_loop(client, offsets, make, plan.timeout, plan.max_in_flight, done)
                bar.close()
                if _by_example(name):  # relevant: the query's own cluster; no oracle (agreement is left empty)
                    own = {j: {cluster} for j, (_, cluster) in enumerate(examples)}
                    row = summarize_point(name, rate, plan.duration, plan.k, run, lambda i: i % len(examples), own, {})
                else:
                    row = summarize_point(
                        name, rate, plan.duration, plan.k, run, lambda i: labels[i % len(labels)], relevant, oracle
                    )
                rows.append(row)
                log(
                    f"  {name} @ {rate:g}/s: {row['ok']}/{row['sent']} ok, p99 {row['p99_ms']:.1f} ms,"
                    f" recall@{plan.k} {row['recall_at_k']:.3f}"
                )
    # label queries and queries by example measure recall differently: fronts and the sweet spot are over the
    # label configurations only, and the examples row is reported beside them
    label_rows = [r for r in rows if not _by_example(r["config"])]
    example_rows = [r for r in rows if _by_example(r["config"])]
    summaries = summarize_configs(label_rows, plan.tolerance)
    for s in summarize_configs(example_rows, plan.tolerance):
        s.pareto = s.sweet_spot = False
        summaries.append(s)
    for r in example_rows:
        r["pareto"] = r["sweet_spot"] = False
    header = [
        f"prunecascade load test: {plan.url}  k={plan.k}  {plan.duration:g}s per point  labels {len(labels)}",
        f"sent {sum(r['sent'] for r in rows)}, errors {sum(r['errors'] for r in rows)}"
        + (f", {skipped} points skipped (--max-seconds)" if skipped else ""),
    ]
    if example_rows:
        header.append(
            f"{EXAMPLES}: {len(examples)} held-out queries by example (GET /v1/space/queries) through the default "
            f"pair cascade{' and the tuned front' if plan.front else ''}; recall@{plan.k} = the query's own cluster in "
            f"the top {plan.k}; not on the label front"
        )
    text = summary_text(summaries, plan.rates, header)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / CSV_FILE, out / SUMMARY_FILE]
    write_csv(rows, out / CSV_FILE)
    (out / SUMMARY_FILE).write_text(text)
    if plan.plots and label_rows:
        from service.loadtest.plots import plot_results

        files += plot_results(label_rows, [s for s in summaries if not _by_example(s.config)], out)
    return Result(rows, summaries, files, text, skipped)


def run_loadtest(
    plan: Plan,
    cluster_labels: np.ndarray,
    out: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Result:
    """Blocking entry point; every request is bounded by plan.timeout, the run by plan.max_requests."""
    if any(not (r > 0 and math.isfinite(r)) for r in plan.rates):
        raise ValueError(f"rates must be positive, got {plan.rates}")
    return asyncio.run(_run(plan, cluster_labels, out, progress, log))
