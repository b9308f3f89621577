"""`prunecascade methods`: every registered pruning method, one line each.

The listing is read from the `@register_method(...)` decorators in the source of `models/pruning/` with `ast`,
not by importing the methods (that imports torch: seconds). tests/test_cli_methods.py checks that it equals
the live registry, method by method."""

from __future__ import annotations

import argparse
import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["register", "run", "MethodLine", "scan_methods"]

DECORATOR = "register_method"
# register_method's keyword defaults (models/pruning/registry.py)
DEFAULTS = {"needs_data": True, "needs_labels": False}


@dataclass(frozen=True)
class MethodLine:
    name: str
    kind: str
    needs_data: bool
    needs_labels: bool
    summary: str

    @property
    def data(self) -> str:
        return "data-free" if not self.needs_data else ("labelled data" if self.needs_labels else "unlabelled data")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "methods", help="list the pruning methods `prune --method` accepts, with the data each one needs"
    )
    p.set_defaults(func=run)


def _pruning_dir() -> Path | None:
    spec = importlib.util.find_spec("models")  # the top package only: `models.pruning` would import torch
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pruning"


def _method_of(fn: ast.FunctionDef) -> MethodLine | None:
    for deco in fn.decorator_list:
        if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Name) and deco.func.id == DECORATOR):
            continue
        name = ast.literal_eval(deco.args[0])
        kw = {k.arg: k.value for k in deco.keywords if k.arg}
        flags = {key: ast.literal_eval(kw[key]) if key in kw else default for key, default in DEFAULTS.items()}
        doc = ast.get_docstring(fn, clean=False) or ""
        summary = doc.strip().splitlines()[0] if doc.strip() else ""
        return MethodLine(name, ast.literal_eval(kw["kind"]), flags["needs_data"], flags["needs_labels"], summary)
    return None


def scan_methods(directory: Path | None = None) -> list[MethodLine]:
    """Every decorated method under `directory` (default: the installed models/pruning), sorted by name."""
    directory = directory or _pruning_dir()
    if directory is None or not directory.is_dir():
        return []
    found: list[MethodLine] = []
    for path in sorted(directory.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef) and (m := _method_of(node)) is not None:
                found.append(m)
    return sorted(found, key=lambda m: m.name)


def _from_registry() -> list[MethodLine]:
    """The slow path (imports torch), for an install without the sources."""
    from models.pruning import list_methods

    return [MethodLine(m.name, m.kind, m.needs_data, m.needs_labels, m.summary) for m in list_methods()]


def run(args: argparse.Namespace) -> int:
    for m in scan_methods() or _from_registry():
        print(f"{m.name:28s} {m.kind:13s} {m.data:16s} {m.summary}")
    return 0
