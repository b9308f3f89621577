"""`prunecascade COMMAND ...`: each command is a module in `service.commands` exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "COMMANDS"]

COMMANDS = ["bootstrap", "serve", "train", "prune", "methods", "evaluate", "tuples", "loadtest", "push"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunecascade", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"service.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, LookupError) as exc:
        print(f"prunecascade {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
