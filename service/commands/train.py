"""`prunecascade train --dataset mnist1d --arch cnn1d --name NAME`."""

from __future__ import annotations

import argparse

from service.commands.common import add_home, registry_from, splits_for

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a dense model and register it")
    add_home(p)
    p.add_argument("--dataset", default="mnist1d", help="mnist1d, digits or a path to an .npz (x, y[, cluster])")
    p.add_argument("--arch", choices=["mlp", "cnn1d", "cnn2d"], default="cnn1d")
    p.add_argument("--hidden", help="comma-separated hidden widths (default: per architecture)")
    p.add_argument("--channels", help="comma-separated conv channels (default: per architecture)")
    p.add_argument("--name", required=True)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=52_000, help="MNIST-1D items to generate")
    p.set_defaults(func=run)


def _widths(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(w) for w in text.split(",")) if text else default


def run(args: argparse.Namespace) -> int:
    from models.dense import default_spec, train_and_register
    from models.spec import NetworkSpec
    from models.training import TrainConfig

    splits = splits_for(args.dataset, args, seed=args.seed, num_samples=args.num_samples)
    base = default_spec(splits, args.arch)
    spec = NetworkSpec(
        base.kind,
        base.input_dim,
        base.num_classes,
        hidden=_widths(args.hidden, base.hidden),
        channels=_widths(args.channels, base.channels),
        kernel_size=base.kernel_size,
    )
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    data_args = {"seed": args.seed, "num_samples": args.num_samples}
    m = train_and_register(registry_from(args), args.name, spec, splits, config, data_args)
    print(f"registered {m.ref}: test accuracy {m.accuracy:.4f}, {m.flops_dense_kernel:,} FLOPs per item")
    return 0
