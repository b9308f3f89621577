"""`prunecascade loadtest --url URL --rates 5,10,20 --duration S --out DIR [grid options]`: open-loop load over
a grid of cascade configurations, scored against the space's true labels and the dense oracle, and the shipped
held-out queries by example through the default pair cascade, scored by their own cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.commands.common import settings_from

if TYPE_CHECKING:
    from service.loadtest.grid import StageSpec
    from service.loadtest.session import Plan

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="load-test a running service over cascade configurations")
    p.add_argument("--url", default=None, help="service base URL (default: http://$PRUNECASCADE_HOST:PORT)")
    p.add_argument("--rates", default="5,10,20", help="comma-separated request rates per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per (configuration, rate) point")
    p.add_argument("--out", type=Path, required=True, help="directory for results.csv, plots and summary.txt")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--home", help="state directory (default: $PRUNECASCADE_HOME or ./var)")
    p.add_argument("--space-dir", type=Path, help="space with the true labels (default: HOME/spaces/SPACE)")
    p.add_argument("--labels", help="comma-separated labels to query, cycled (default: every class)")
    g = p.add_argument_group("grid (stages separated by '/', choices by ','; omit --variants for the default)")
    g.add_argument("--variants", help="e.g. 'cnn-s25,cnn-m10/cnn-s50/dense'")
    g.add_argument("--samples", default="4", help="e.g. '2,4/4/10'; one group applies to every stage")
    g.add_argument("--keep", default="-", help="e.g. '200/40/-'; '-' on the last stage (it keeps k)")
    g.add_argument("--aggregators", default="bayes", help="e.g. 'bayes,mean_prob/bayes'")
    g.add_argument("--with-default", action="store_true", help="also run the service's default cascade")
    g.add_argument(
        "--no-exact", action="store_true", help="leave out the exact path (label answers from the dense table)"
    )
    g.add_argument(
        "--no-examples",
        action="store_true",
        help="leave out the held-out queries by example through the default pair cascade (the main path; skipped "
        "anyway where the space ships none)",
    )
    g.add_argument(
        "--front",
        action="store_true",
        help="also replay every plan of the tuned front (GET /v1/cascade) with the held-out queries by example",
    )
    g.add_argument("--max-configs", type=int, default=64, help="refuse grids larger than this")
    b = p.add_argument_group("bounds")
    b.add_argument("--max-requests", type=int, default=20_000, help="refuse runs that would send more")
    b.add_argument("--max-seconds", type=float, default=1800.0, help="start no new point after this")
    b.add_argument("--timeout", type=float, default=10.0, help="per request, from its scheduled send")
    b.add_argument("--max-in-flight", type=int, default=256, help="open connections at most")
    b.add_argument("--ready-wait", type=float, default=30.0, help="seconds to wait for /readyz")
    b.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    c = p.add_argument_group("throughput against concurrency (instead of the open-loop grid)")
    c.add_argument(
        "--concurrency",
        help="e.g. '1,2,4,8': closed-loop clients per point; measures queries/s, p50/p99 and the server's CPU for "
        "--kinds, writes concurrency.csv and throughput_vs_concurrency.png",
    )
    c.add_argument("--kinds", default="cascade,faiss,exact", help="of cascade (default cascade), faiss, exact")
    c.add_argument(
        "--server-pid", type=int, help="the server's pid on this host (CPU of it and its workers from /proc)"
    )
    p.add_argument("--tolerance", type=float, default=0.01, help="sweet spot: recall within this of the best")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (matplotlib not installed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated numbers, got {text!r}") from None


def build_plan(args: argparse.Namespace) -> Plan:
    from service.loadtest.grid import cascade_label, expand_grid
    from service.loadtest.session import EXACT, EXAMPLES, Plan, planned_requests
    from service.loadtest.target import check_target

    settings = settings_from(args)
    url = args.url or f"http://{settings.host}:{settings.port}"
    check_target(url, args.allow_remote)
    configs: list[tuple[str, tuple[StageSpec, ...] | None]] = []
    if args.variants:
        grid, dropped = expand_grid(args.variants, args.samples, args.keep, args.aggregators, args.k, args.max_configs)
        for reason in dropped:
            print(f"skipping {reason}", file=sys.stderr)
        configs += [(cascade_label(stages), stages) for stages in grid]
    if not args.variants or args.with_default:
        configs.append(("default", None))
    if not args.no_exact:
        configs.append((EXACT, None))
    if not args.no_examples:
        configs.append((EXAMPLES, None))
    if not configs:
        raise ValueError("no valid configuration in the grid")
    labels = tuple(int(x) for x in args.labels.split(",")) if args.labels else None
    plan = Plan(
        url=url.rstrip("/"),
        rates=_floats(args.rates, "rates"),
        duration=args.duration,
        k=args.k,
        configs=tuple(configs),
        labels=labels,
        timeout=args.timeout,
        max_in_flight=args.max_in_flight,
        max_requests=args.max_requests,
        max_seconds=args.max_seconds,
        ready_wait=args.ready_wait,
        tolerance=args.tolerance,
        plots=not args.no_plots,
        front=args.front,
    )
    planned_requests(plan)  # refuses bad rates, durations and over-budget runs before anything is sent
    return plan


def run(args: argparse.Namespace) -> int:
    import httpx

    if args.concurrency:
        return _run_concurrency(args)

    from cascade.space import Space
    from service.loadtest.session import run_loadtest

    plan = build_plan(args)
    space_dir = args.space_dir or settings_from(args).space_dir
    space = Space.load(space_dir)
    try:
        result = run_loadtest(plan, space.cluster_labels, args.out, progress=not args.quiet)
    except (RuntimeError, httpx.HTTPError) as exc:  # not ready, oracle refused, connection refused
        print(f"prunecascade loadtest: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary, end="")
    print("wrote " + ", ".join(str(f) for f in result.files))
    return 1 if sum(r["errors"] for r in result.rows) else 0


def _run_concurrency(args: argparse.Namespace) -> int:
    from service.loadtest.concurrency import run_sweep, write_sweep
    from service.loadtest.target import check_target

    settings = settings_from(args)
    url = args.url or f"http://{settings.host}:{settings.port}"
    check_target(url, args.allow_remote)
    counts = [int(x) for x in args.concurrency.split(",")]
    rows = run_sweep(url, counts, [k for k in args.kinds.split(",") if k], args.duration, args.k, args.server_pid)
    print("| kind | answered by | clients | queries/s | ratio to the first | p50 / p99 ms | server CPU | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.kind} | {r.modes} | {r.concurrency} | {r.qps:.1f} | {r.ratio_to_first:.2f}x "
            f"| {r.p50_ms:.1f} / {r.p99_ms:.1f} | {100 * r.server_cpu:.0f}% | {r.errors} |"
        )
    files = write_sweep(rows, args.out, plot=not args.no_plots)
    print("wrote " + ", ".join(str(f) for f in files))
    return 1 if sum(r.errors for r in rows) else 0
