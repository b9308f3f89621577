"""`prunecascade reader`: train a cluster reader for a home's space (a pair model that reads a candidate cluster's
members together, `models.cluster_reader`), store it beside the space, and check it on the dev queries: it answers
queries by example by default only where it beats FAISS alone there. Training takes two hours or more on one core for
the recipe's 48,000 steps, so the first run's bootstrap does not do it: `make run` runs this command in the
background once the service is up (`service/reader_training.py`). A running server adopts the result with
`POST /v1/admin/reload`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.commands.common import add_home, settings_from

__all__ = ["parse_shape", "register", "run"]

SHAPE_FIELDS = ("d", "dv", "hidden", "context", "max_shift")
"""The integer fields of `ReaderSpec` that a user may set from the command line: its widths and reach."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reader",
        help="train the cluster reader; it serves where it beats FAISS on dev",
        description="Train a cluster reader on the home's training prototypes (the retriever's own candidate "
        "lists, listwise), store it beside the space, then measure its rerank of FAISS's top candidates against "
        "FAISS alone on the dev queries and record the verdict in cascade.json. With --check only the stored "
        "reader is measured again.",
    )
    add_home(p)
    p.add_argument("--check", action="store_true", help="do not train: check the stored reader on dev queries")
    p.add_argument(
        "--steps",
        type=int,
        help="training steps (default: the recipe's, `ReaderTrainConfig.steps`: 48,000, two hours or more)",
    )
    p.add_argument(
        "--alone-steps", type=int, help="of which the first train the reader without the residual (default 3/4)"
    )
    p.add_argument(
        "--candidates", type=int, default=10, help="FAISS's top clusters the reader reorders (and trains on)"
    )
    p.add_argument("--members", type=int, default=10, help="members read per cluster (a uniform sample beyond)")
    p.add_argument("--pool", type=int, help="FAISS's top clusters ranked by expected gain (default 30)")
    p.add_argument("--dev-queries", type=int, help="check on the first N dev queries (default: all)")
    p.add_argument(
        "--per-query",
        type=Path,
        metavar="NPZ",
        help="also write the check's per-query rows (recall@1, recall@k, nDCG@k, FLOPs, ms per method, and each "
        "query's own cluster), to compare two readers query by query (lab/reader_duel.py)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        help="how sure the check must be that the reader answers more dev queries better than worse (default: "
        "$PRUNECASCADE_READER_CONFIDENCE or 0.95)",
    )
    p.add_argument(
        "--shape",
        nargs="+",
        default=[],
        metavar="FIELD=INT",
        help="the reader's widths, fields of ReaderSpec (default: the served shape, d=33 dv=32 hidden=128 "
        "context=7). `d=32 dv=16 hidden=64` keeps the conv at 43%% of the FLOPs per query: at 32,000 steps, of 2,400 "
        "dev queries (1,000 of them fresh ones on 100,000 items) it answered 119 right first that the served shape "
        'did not, and the served shape 169 (docs/performance.md section 0, "The 100k space on 2,000 fresh queries")',
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.set_defaults(func=run)


def parse_shape(items: list[str]) -> dict[str, int]:
    """`FIELD=INT` words as `ReaderSpec` fields; a field it does not know or a value that is not an integer raises
    naming it (the values themselves are checked by `ReaderSpec`)."""
    shape: dict[str, int] = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or field not in SHAPE_FIELDS:
            raise ValueError(f"--shape takes FIELD=INT with FIELD one of {', '.join(SHAPE_FIELDS)}, not {item!r}")
        try:
            shape[field] = int(value)
        except ValueError:
            raise ValueError(f"--shape {field} must be an integer, not {value!r}") from None
    return shape


def run(args: argparse.Namespace) -> int:
    import torch

    from cascade.config import CONFIG_FILE, CascadeConfig
    from cascade.reader_gate import DEV_COLUMNS, measure_reader
    from cascade.snapshot import load_snapshot
    from models.registry import ModelRegistry

    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    confidence = settings.reader_confidence if args.confidence is None else args.confidence
    if not 0.5 <= confidence < 1.0:  # before an hour of training, not after
        raise ValueError(f"--confidence must be in [0.5, 1), not {confidence}")
    if args.candidates < 1:
        raise ValueError(f"--candidates must be at least 1, not {args.candidates}")
    shape = parse_shape(args.shape)
    if args.check and shape:
        raise ValueError("--shape chooses the shape of a reader to train: the check reads the stored one's")
    config_path = settings.home / CONFIG_FILE
    if not args.check:
        record = train(settings.space_dir, settings.home, args, shape)
        print(f"trained in {record['seconds']:.0f} s; stored beside {settings.space_dir}")
    snapshot = load_snapshot(ModelRegistry(settings.registry_dir), settings.space_dir, CascadeConfig.load(config_path))
    if snapshot.reader is None:
        raise LookupError(f"{settings.space_dir} holds no cluster reader: run `prunecascade reader` without --check")
    choice, per_query = measure_reader(
        snapshot, args.candidates, args.members, args.dev_queries, pool=args.pool, confidence=confidence
    )
    if args.per_query is not None:
        import numpy as np

        np.savez(args.per_query, columns=np.asarray(DEV_COLUMNS), sha256=np.asarray(choice.sha256), **per_query)
    CascadeConfig.load(config_path).model_copy(update={"reader": choice}).save(config_path)
    print(json.dumps(choice.dev, indent=1))
    print(choice.reason)
    return 0


def train(space_dir: Path, home: Path, args: argparse.Namespace, shape: dict | None = None, **recipe: object) -> dict:
    """Train with the space's retriever on the clusters the bootstrap trained the pair models on, never the space's
    own: the training prototypes of its record in bootstrap.json, or on a user's data the training split's
    clusters (each query a held-out member), rebuilt from the dense model's data arguments. `shape`: fields of
    `ReaderSpec` and `recipe` fields of `ReaderTrainConfig` to change (the lab's comparisons)."""
    from dataclasses import replace

    from cascade.config import CONFIG_FILE, CascadeConfig
    from cascade.embedding import EmbeddingIndex
    from cascade.space import Space
    from models.cluster_reader import ReaderSpec
    from models.cluster_reader_store import save_reader, stored_digest
    from models.cluster_reader_training import ReaderTrainConfig, train_reader

    embedding = EmbeddingIndex.load(space_dir)
    if embedding is None:
        raise ValueError(f"{space_dir} has no bi-encoder: the reader's features and residual come from it")
    spec = ReaderSpec(encoder=embedding.encoder.spec.to_dict(), **(shape or {}))  # raises naming a bad width
    if Space.load(space_dir).meta.get("clusters") == "prototypes":
        train_set, held = _prototype_sets(home)
    else:
        train_set, held = _user_sets(home, args)
    steps = args.steps if args.steps is not None else ReaderTrainConfig.steps
    alone = args.alone_steps if args.alone_steps is not None else steps * 3 // 4
    # trained on the lists it will read: its own cluster among FAISS's top `candidates`, all of them
    width = args.candidates
    config = ReaderTrainConfig(steps=steps, alone_steps=alone, seed=args.seed, top=width, group=width + 1)
    config = replace(config, **recipe)  # type: ignore[arg-type]

    def progress(row: dict) -> None:
        print(json.dumps(row), flush=True)

    model, record = train_reader(spec, embedding.encoder, train_set, held, config, progress)  # type: ignore[arg-type]
    # the reader it replaces is kept for a rollback, with the check it was served under (if that check is its own)
    served = CascadeConfig.load(home / CONFIG_FILE).reader
    kept = served.model_dump(mode="json") if served is not None and served.sha256 == stored_digest(space_dir) else None
    save_reader(model, spec, space_dir, extra=record, check=kept)
    return record


def _prototype_sets(home: Path):
    from dataclasses import replace

    from cascade.bootstrap import prototype_training_sets
    from cascade.bootstrap_config import PairConfig
    from models.prototypes import PrototypeConfig

    pair = PairConfig()
    recorded = home / "bootstrap.json"
    if recorded.exists():  # the home's own training prototypes (a home built with another recipe)
        fields = json.loads(recorded.read_text()).get("pair", {}).get("train")
        if fields:
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
            pair = replace(pair, train=PrototypeConfig(**fields))
    return prototype_training_sets(pair)


def _user_sets(home: Path, args: argparse.Namespace):
    from cascade.bootstrap import user_pair_sets
    from cascade.config import CONFIG_FILE, CascadeConfig
    from service.commands.common import registry_from, splits_for

    dense = registry_from(args).manifest(CascadeConfig.load(home / CONFIG_FILE).dense)
    return user_pair_sets(splits_for(dense.dataset, args, **dense.extra.get("data_args", {})))
