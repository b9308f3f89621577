"""`prunecascade bootstrap [--dataset mnist1d|digits|PATH.npz] [--space-dataset PATH.npz] [--arch mlp|cnn1d|cnn2d]
[--pair/--no-pair] [--pair-steps N] [--home DIR]`: build a home (data, dense model, pruned variants, pair models
for queries by example, space with its index, default cascade); skips what exists."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from service.commands.common import add_home, settings_from

__all__ = ["register", "run", "config_from", "ARCHS"]

ARCHS = ("mlp", "cnn1d", "cnn2d")
BOOTSTRAP_RECORD = "bootstrap.json"  # cascade.bootstrap_record.RECORD_FILE (kept here: no torch import)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="build a home from the MNIST-1D demo or your own .npz: train, prune, index the space",
        description="Build a home: load the data, train the dense model, prune it into the cascade's variants, "
        "build the space of clusters and its FAISS index, and write the default cascade. Steps whose result "
        "already exists under the home are skipped, so a second run is ready in seconds.",
    )
    add_home(p)
    p.add_argument(
        "--dataset",
        default="mnist1d",
        help="mnist1d (generated locally), digits, or a path to an .npz with x (items x features), y (integer "
        "labels, any values) and optionally cluster (an integer cluster id per item), id (a unique integer id per "
        "item) and classes (every label the data may have). With a cluster column, whole clusters go either to "
        "training or to the space",
    )
    p.add_argument(
        "--space-dataset",
        metavar="PATH.npz",
        help="a separate .npz that is the space (same columns); --dataset is then only trained on",
    )
    p.add_argument("--arch", choices=ARCHS, help="dense network (default: cnn1d for mnist1d, else mlp)")
    p.add_argument("--epochs", type=int, help="training epochs of the dense model (default: 40)")
    p.add_argument("--seed", type=int, help="data split and training seed (default: 0)")
    p.add_argument("--cluster-size", type=int, help="items per same-label cluster when the data has no cluster column")
    p.add_argument("--kmeans-clusters", type=int, help="without a cluster column: K clusters by FAISS k-means instead")
    p.add_argument(
        "--pair",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="your .npz: train pair models (cross-encoders) and a bi-encoder on its clusters, so that queries by "
        "example run the pair cascade; the space then ships held-out members as queries. Default: on exactly "
        "when the data has a cluster column. --no-pair builds the classifier path only (faster)",
    )
    p.add_argument(
        "--pair-steps",
        type=int,
        help="training steps of the dense pair model (default: 300, listwise); the bi-encoder gets two thirds as "
        "many and each pruned variant's fine-tuning a fifth",
    )
    p.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="end by tuning the default pair cascade on the space's dev queries (default: on; FAISS alone where "
        "the dense rerank does not beat it); --no-tune keeps the built-in stages",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> Any:
    """The `cascade.bootstrap_config.BootstrapConfig` the flags ask for (unset flags keep the config's defaults)."""
    from cascade.bootstrap_config import BootstrapConfig

    dataset = args.dataset
    if dataset not in ("mnist1d", "digits"):
        dataset = _npz_path("--dataset", dataset, "mnist1d, digits or a path ending in .npz")
    space_dataset = getattr(args, "space_dataset", None)
    if space_dataset is not None:
        if dataset in ("mnist1d", "digits"):
            raise ValueError("--space-dataset: needs --dataset to be your own training .npz")
        space_dataset = _npz_path("--space-dataset", space_dataset, "a path ending in .npz")
    arch = args.arch or ("cnn1d" if dataset == "mnist1d" else "mlp")
    for name in ("epochs", "cluster_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    if args.kmeans_clusters is not None and args.kmeans_clusters < 1:
        raise ValueError(f"--kmeans-clusters: must be >= 1, got {args.kmeans_clusters}")
    pair_flag = getattr(args, "pair", None)
    pair_steps = getattr(args, "pair_steps", None)
    if pair_flag is not None and dataset in ("mnist1d", "digits"):
        raise ValueError("--pair/--no-pair: apply to your own .npz (mnist1d always has pair models, digits none)")
    if pair_steps is not None and pair_steps < 1:
        raise ValueError(f"--pair-steps: must be >= 1, got {pair_steps}")
    overrides = {
        k: v
        for k, v in (
            ("epochs", args.epochs),
            ("seed", args.seed),
            ("cluster_size", args.cluster_size),
            ("kmeans_clusters", args.kmeans_clusters),
        )
        if v is not None
    }
    if space_dataset is not None:
        overrides["space_dataset"] = space_dataset
    if pair_flag is not None:
        overrides["user_pair"] = pair_flag
    if getattr(args, "tune", None) is not None:
        overrides["tune"] = args.tune
    config = BootstrapConfig(dataset=dataset, arch=arch, **overrides)
    if pair_steps is not None and config.pair is not None:
        config = replace(config, pair=_pair_with_steps(config.pair, pair_steps))
    return config


def _pair_with_steps(pair: Any, steps: int) -> Any:
    """The pair config with `steps` dense training steps and the others scaled alike (evaluation intervals
    capped at the step count, so a short run still keeps its best checkpoint)."""
    training = replace(pair.training, steps=steps, eval_every=min(pair.training.eval_every, steps))
    bi_steps = max(1, steps * 2 // 3)
    biencoder = replace(pair.biencoder, steps=bi_steps, eval_every=min(pair.biencoder.eval_every, bi_steps))
    variants = tuple(replace(v, finetune_steps=min(v.finetune_steps, max(1, steps // 5))) for v in pair.variants)
    out = replace(pair, training=training, biencoder=biencoder, variants=variants)
    if hasattr(pair, "listwise"):  # the dense pair model trains listwise on the retriever's candidate lists
        listwise = replace(pair.listwise, steps=steps, eval_every=min(pair.listwise.eval_every, steps))
        out = replace(out, listwise=listwise)
    return out


def _npz_path(flag: str, value: str, expected: str) -> str:
    """An existing .npz, recorded absolute: the home keeps it and later commands may run from elsewhere."""
    path = Path(value).expanduser()
    if path.suffix != ".npz":
        raise ValueError(f"{flag}: expected {expected}, got {value!r}")
    if not path.is_file():
        raise ValueError(f"{flag}: no such file {str(path)!r}")
    return str(path.resolve())


def _check_home_matches(home: Path, config: Any) -> None:
    """A home built from other data or another architecture must not be half-reused."""
    record = home / BOOTSTRAP_RECORD
    if not record.is_file():
        return
    built = json.loads(record.read_text())
    started = " (that run did not complete)" if built.get("state", "complete") != "complete" else ""
    for key in ("dataset", "space_dataset", "arch"):
        if str(built.get(key)) != str(getattr(config, key)) and (key in built or getattr(config, key) is not None):
            raise ValueError(
                f"{home} was bootstrapped with {key}={built.get(key)!r}{started}, not {getattr(config, key)!r}: "
                "pass another --home for different data"
            )


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from cascade.bootstrap import bootstrap
    from cascade.bootstrap_record import grades_line, read_record

    settings = settings_from(args)
    config = config_from(args)
    _check_home_matches(settings.home, config)
    # tqdm.write: the line goes above a progress bar already on the terminal, never into it
    cascade = bootstrap(settings.home, config, progress=not args.quiet, on_estimate=lambda e: tqdm.write(e.line()))
    print(f"ready under {settings.home}: cascade " + " -> ".join(s.variant for s in cascade.stages))
    if cascade.pair_stages:
        print("queries by example: pair cascade " + " -> ".join(s.variant for s in cascade.pair_stages))
    elif cascade.pair_stages is not None:
        print("queries by example: FAISS alone")
    grades = grades_line(read_record(settings.home) or {})
    if grades is not None:
        print(grades)
    if cascade.pair_tuning is not None:
        print(f"  (tuned on {cascade.pair_tuning.dev_queries} dev queries: {cascade.pair_tuning.reason})")
    print(f"serve it with: prunecascade serve --home {settings.home}")
    return 0
