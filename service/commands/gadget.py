"""`prunecascade gadget --variant pair-s10 --kind lstm`: train an aggregation gadget over a pair model's hidden
states and store it beside the variant, so that a stage `{"variant": "pair-s10",
"aggregator": "lstm"}` can be served. A variant holds one gadget: storing another replaces it. A running service
adopts it on `POST /v1/admin/reload`."""

from __future__ import annotations

import argparse
import json

from service.commands.common import add_home, registry_holding, settings_from
from service.commands.verdict import gadget_verdict

__all__ = ["register", "run", "KINDS"]

# models.gadget.GADGET_KINDS, spelled out so that the parser does not import torch
KINDS = ("lstm", "deepsets")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gadget", help="train an LSTM / deep-sets gadget for a pair model and store it beside it")
    add_home(p)
    p.add_argument("--variant", required=True, help="NAME or NAME:VERSION of a registered pair model")
    p.add_argument("--kind", choices=list(KINDS), default="lstm")
    p.add_argument("--tuples", type=int, default=6000, help="training pool: tuples of --n-max members each")
    p.add_argument("--val-tuples", type=int, default=1000, help="validation tuples (prototypes no model saw)")
    p.add_argument("--n-max", type=int, default=16, help="n is drawn from 1..this per training tuple")
    p.add_argument("--hidden", type=int, default=32, help="LSTM state / deep-sets head width")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the stored gadget's whole record as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from models.pair_gadget_training import store_pair_gadget, train_gadget_for

    if min(args.tuples, args.val_tuples, args.n_max, args.hidden, args.steps) < 1:
        raise ValueError("--tuples, --val-tuples, --n-max, --hidden and --steps must be positive")
    torch.set_num_threads(settings_from(args).torch_threads)
    name, _, version = args.variant.partition(":")
    registry = registry_holding(args, name)
    manifest = registry.manifest(name, int(version) if version else None)
    gadget, record = train_gadget_for(
        registry,
        manifest.name,
        manifest.version,
        kind=args.kind,
        train_tuples=args.tuples,
        val_tuples=args.val_tuples,
        n_max=args.n_max,
        hidden_size=args.hidden,
        steps=args.steps,
        seed=args.seed,
    )
    meta = store_pair_gadget(registry, manifest.name, manifest.version, gadget, extra=record)
    if args.json:
        print(json.dumps({"variant": manifest.ref, "kind": args.kind, **meta}, indent=2))
        return 0
    print(f"stored a {args.kind} gadget beside {manifest.ref} (a running server adopts it on POST /v1/admin/reload)")
    print(gadget_verdict(manifest.ref, args.kind, record))
    return 0
