"""Arguments and loaders several commands share. Heavy modules (torch, the registry) are imported inside the
functions, so that building the parser stays fast."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.data import Splits
    from models.registry import ModelRegistry
    from service.settings import Settings

__all__ = ["add_home", "settings_from", "registry_from", "registry_holding", "splits_for"]


def add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="state directory (default: $PRUNECASCADE_HOME or ./var)")


def settings_from(args: argparse.Namespace) -> Settings:
    from service.settings import Settings

    return Settings(home=args.home) if getattr(args, "home", None) else Settings()


def registry_from(args: argparse.Namespace) -> ModelRegistry:
    from models.registry import ModelRegistry

    return ModelRegistry(settings_from(args).registry_dir)


def registry_holding(args: argparse.Namespace, name: str) -> ModelRegistry:
    """The home's registry, when it holds model `name`; otherwise a refusal that says which home was read and
    how to get one, before anything is written (opening a registry creates its directory)."""
    from models.registry import ModelRegistry

    settings = settings_from(args)
    where = settings.registry_dir
    entries = where.iterdir() if where.is_dir() else iter(())
    held = sorted(p.name for p in entries if p.is_dir() and not p.name.startswith("."))
    if name not in held:
        what = f"holds {', '.join(held)}" if held else "is empty (no bootstrapped home there)"
        raise LookupError(
            f"no model {name!r} in {settings.home}: its registry {what}. Pass --home with the home that holds it "
            f"(`make run` builds ./var; `prunecascade bootstrap --home {settings.home}` builds this one)"
        )
    return ModelRegistry(where)


def splits_for(
    dataset: str,
    args: argparse.Namespace,
    seed: int = 0,
    num_samples: int = 52_000,
    space_dataset: str | None = None,
) -> Splits:
    """The same seed, size and space file give the same splits the model was trained on."""
    from models.data import load_dataset

    return load_dataset(
        dataset,
        seed=seed,
        num_samples=num_samples,
        cache_dir=settings_from(args).data_dir,
        space_dataset=space_dataset,
    )
