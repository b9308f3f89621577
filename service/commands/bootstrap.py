"""`prunecascade bootstrap`: build the embedded default under HOME (skips what exists)."""

from __future__ import annotations

import argparse

from cascade.bootstrap import bootstrap
from service.commands.common import add_home, settings_from

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bootstrap", help="generate data, train, prune and build the default space")
    add_home(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    config = bootstrap(settings.home)
    print(f"ready under {settings.home}: cascade " + " -> ".join(s.variant for s in config.stages))
    return 0
