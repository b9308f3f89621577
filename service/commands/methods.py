"""`prunecascade methods`: every registered pruning method."""

from __future__ import annotations

import argparse

from models.pruning import list_methods

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the pruning methods")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for m in list_methods():
        data = "data-free" if not m.needs_data else ("labelled data" if m.needs_labels else "unlabelled data")
        print(f"{m.name:28s} {m.kind:13s} {data:16s} {m.summary}")
    return 0
