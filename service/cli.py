"""`prunecascade COMMAND ...`: each command is a module in `service.commands` exposing `register(subparsers)`.

Only the module of the command being run is imported (the others get a placeholder parser carrying their
one-line help), and command modules import torch, FAISS and the engine inside `run`: so `--help`,
`--version` and `methods` answer without loading them (torch alone takes seconds to import)."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

__all__ = ["main", "build_parser", "command_list", "COMMANDS", "DESCRIPTION", "package_version"]

# The order a newcomer meets them in: build a home, serve it, then the tools around it. One line each, for a user.
COMMANDS: dict[str, str] = {
    "bootstrap": "build a home from the MNIST-1D demo or your own .npz file",
    "serve": "serve a home over HTTP (queries, catalog, admin, /docs)",
    "queries": "print held-out queries by example, ready to POST to /v1/query",
    "train": "train a dense model and add it to the home's registry",
    "prune": "prune a registered model into a smaller registry entry",
    "methods": "list the pruning methods and the data each one needs",
    "evaluate": "recall, FLOPs and time of a cascade vs the dense model",
    "tune": "choose the default pair cascade from measurements on dev queries",
    "gadget": "train an LSTM / deep-sets gadget for a pair model, stored beside it",
    "reader": "train the cluster reader; it serves where it beats FAISS on dev",
    "loadtest": "load-test a running service over cascade configurations",
    "push": "upload a registry entry to a running service (admin token)",
}

DESCRIPTION = """\
Retrieval over a space of item clusters through a cascade of pruned neural networks.

A "home" directory (--home, default $PRUNECASCADE_HOME or ./var) holds the model registry, the space of
clusters with its FAISS index and the default cascade. Build one, serve it, then query it over HTTP."""

EPILOG = """\
{commands}

first steps:
  prunecascade bootstrap --dataset mine.npz --home var-mine  # your data: .npz with x, y[, cluster]
  prunecascade serve --home var-mine                         # then open http://127.0.0.1:8000/docs
  prunecascade bootstrap                                     # or the built-in MNIST-1D demo, in ./var

`prunecascade COMMAND --help` shows each command's options."""


def command_list() -> str:
    width = max(map(len, COMMANDS))
    return "commands:\n" + "\n".join(f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items())


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), or a marker when run from an uninstalled tree."""
    try:
        return version("prunecascade")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(command: str = "") -> argparse.ArgumentParser:
    """The full parser of `command` (none when ""), and for every other command a placeholder carrying its
    one-line help: `prunecascade --help` lists them all without importing any."""
    parser = argparse.ArgumentParser(
        prog="prunecascade",
        usage="%(prog)s [-h] [--version] COMMAND [options]",
        description=DESCRIPTION,
        epilog=EPILOG.format(commands=command_list()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    # the command list is in the epilog (one line each, aligned); argparse's own listing would wrap
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS, prog="prunecascade"
    )
    for name, summary in COMMANDS.items():
        if name == command:
            importlib.import_module(f"service.commands.{name}").register(sub)
            sub.choices[name].description = sub.choices[name].description or summary
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(chosen if chosen in COMMANDS else "").parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, LookupError) as exc:
        print(f"prunecascade {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
