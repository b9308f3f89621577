"""`prunecascade serve [--bootstrap]`: run the HTTP service with uvicorn."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import uvicorn

from service.admin_token import first_run_token
from service.app import create_app
from service.commands.common import add_home, settings_from
from service.connections import with_head_timeout
from service.settings import Settings

if TYPE_CHECKING:
    from service.state import ServiceState

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API")
    add_home(p)
    p.add_argument("--host", help="default: $PRUNECASCADE_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: $PRUNECASCADE_PORT or 8000")
    p.add_argument(
        "--bootstrap",
        action="store_true",
        help="build the embedded default first if it is missing; with no admin token configured, generate one "
        "into HOME/admin-token (owner-only) and print how to use it",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes (default: $PRUNECASCADE_WORKERS or 1); they share the item cache's memory-mapped "
        "files (docs/operations.md, capacity)",
    )
    p.add_argument(
        "--train-reader",
        action="store_true",
        help="where no cluster reader is stored, train one in the background and serve it if its dev check "
        "chooses it (default: $PRUNECASCADE_TRAIN_READER or off; about an hour of one core)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=overrides)
    # the first run gets a usable admin path: a token generated once into the home (printed, not logged)
    settings, note = first_run_token(settings, generate=args.bootstrap)
    if note is not None:
        print(note, flush=True)
    if args.workers is not None:
        settings = settings.model_copy(update={"workers": args.workers})
    if args.train_reader:
        settings = settings.model_copy(update={"train_reader": True})
    if settings.workers > 1:
        return _run_workers(settings, args.bootstrap)
    # log_config=None: uvicorn's own loggers propagate to the JSON handler `create_app` installs; the access
    # line is written by service.logs (with the request id), so uvicorn's is off. Slow or idle clients are
    # bounded: request-head timeout, keep-alive timeout, and a connection limit (503 beyond it).
    app = create_app(settings, _bootstrap if args.bootstrap else None)  # the port opens before the bootstrap runs
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        http=with_head_timeout(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
    )
    return 0


def _bootstrap(state: ServiceState) -> None:
    """Build whatever of the embedded default is missing (run by the app's loader thread before the final load).
    The service answers once the space and its FAISS index are built, from FAISS alone and the exact table, while
    the pair models train and are tuned; then it reloads."""
    from cascade.bootstrap import bootstrap

    # progress bars only to a terminal: in a log file or a container's log they are escape codes between the
    # JSON lines; the steps themselves are logged (and shown by /healthz and /readyz) either way
    bootstrap(
        state.settings.home,
        progress=sys.stderr.isatty(),
        on_progress=state.report_bootstrap,
        on_servable=state.load_early,
    )


def _run_workers(settings, bootstrap: bool) -> int:
    """Several worker processes behind one port, forked from this one once it has imported the service and read the
    home (service/workers.py, service/preload.py): they share its imported modules and loaded models and map the
    same item-input files; their malloc arenas are capped here (service/malloc_arenas.py). The settings reach the
    workers through the environment; with `--bootstrap` the embedded default is built first, before the port opens
    (the workers must not build it concurrently), in a process of its own so that this one forks with no torch
    thread pool started."""
    import multiprocessing
    import os

    from service.workers import serve_forked

    if bootstrap:
        build = multiprocessing.get_context("spawn").Process(target=_build_default, args=(settings.home,))
        build.start()
        build.join()
        if build.exitcode != 0:
            print(f"the bootstrap failed (exit code {build.exitcode}); see its log above", file=sys.stderr)
            return 1
    os.environ.update(
        {
            "PRUNECASCADE_HOME": str(settings.home),
            "PRUNECASCADE_HOST": settings.host,
            "PRUNECASCADE_PORT": str(settings.port),
            "PRUNECASCADE_HEADER_TIMEOUT_S": str(settings.header_timeout_s),
            "PRUNECASCADE_TRAIN_READER": str(settings.train_reader).lower(),
        }
    )
    if settings.admin_token_file is not None:  # e.g. the token the first run generated into the home
        os.environ["PRUNECASCADE_ADMIN_TOKEN_FILE"] = str(settings.admin_token_file)
    from service.connections import EnvHeadTimeoutH11Protocol
    from service.malloc_arenas import limit_arenas

    limit_arenas(settings.malloc_arenas)  # before the home is read, so that every worker inherits the cap
    if settings.preload_home:
        from service.preload import read_before_fork

        read_before_fork(Settings())  # as the workers will read their settings: from the environment

    config = uvicorn.Config(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        http=EnvHeadTimeoutH11Protocol,
        loop="service.accept:BalancedAcceptLoop",  # spreads connections over the workers (service/accept.py)
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
    )
    return serve_forked(config, settings.workers)


def _build_default(home) -> None:
    from cascade.bootstrap import bootstrap as build

    build(home, progress=True)
