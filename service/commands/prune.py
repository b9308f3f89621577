"""`prunecascade prune --from NAME --method METHOD --keep FRACTION --name NEW`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from service.commands.common import add_home, registry_holding, splits_for
from service.commands.verdict import prune_verdict

if TYPE_CHECKING:
    from models.manifest import Manifest
    from models.registry import ModelRegistry

__all__ = ["register", "BUDGETS"]

# models.pruning.budgets.BUDGET_RULES, spelled out so that the parser does not import torch (a test checks they agree)
BUDGETS = ("uniform", "equal-error")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a registered model into a smaller registry entry")
    add_home(p)
    p.add_argument("--from", dest="parent", required=True, help="NAME or NAME:VERSION of the model to prune")
    p.add_argument("--method", required=True, help="see `prunecascade methods`")
    p.add_argument("--keep", type=float, required=True, help="fraction of weights (unstructured) or units kept")
    p.add_argument("--name", required=True, help="registry name of the result")
    p.add_argument("--scope", choices=["global", "layer"], default="global")
    p.add_argument("--reweight", action="store_true", help="least-squares reweighting of the next layer")
    p.add_argument(
        "--budget",
        choices=list(BUDGETS),
        default="uniform",
        help="structured: units per layer (uniform fraction, or equal greedy reconstruction error at equal FLOPs)",
    )
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs after pruning (off)")
    p.add_argument("--calibration-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-activate", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the stored manifest as JSON")
    p.set_defaults(func=run)


def _registered(registry: ModelRegistry) -> list[Manifest]:
    """The active models whose manifests read (a broken entry is the server's to report, not this verdict's)."""
    from models.registry import RegistryError

    out = []
    for name in registry.names():
        try:
            if registry.active_version(name) is not None:
                out.append(registry.manifest(name))
        except (RegistryError, ValueError, OSError):
            continue
    return out


def run(args: argparse.Namespace) -> int:
    from models.pruning.pipeline import prune_and_register

    name = args.parent.partition(":")[0]
    registry = registry_holding(args, name)
    parent = registry.manifest(name)
    splits = splits_for(parent.dataset, args, **parent.extra.get("data_args", {}))
    m = prune_and_register(
        registry,
        args.parent,
        args.method,
        args.keep,
        args.name,
        splits,
        scope=args.scope,
        reweight=args.reweight,
        budget=args.budget,
        finetune_epochs=args.finetune_epochs,
        calibration_size=args.calibration_size,
        seed=args.seed,
        activate=not args.no_activate,
        progress=True,
    )
    print(
        f"registered {m.ref}: accuracy {m.accuracy:.4f}, FLOPs {m.flops_nonzero:,} nonzero / "
        f"{m.flops_dense_kernel:,} dense-kernel, output deviation {m.output_deviation:.3f}"
    )
    print(prune_verdict(m, _registered(registry)))
    if args.json:
        print(m.model_dump_json(indent=2))
    return 0
