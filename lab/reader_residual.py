"""The reader's residual multiple (key = reader + alpha x the retriever's score): which training groups and which
alpha. Works on a home in place (use a copy), leaving `prunecascade reader --check` and `prunecascade evaluate` to
measure what it stores (docs/performance.md, "A user's clusters").

    # train as `prunecascade reader --steps N` does, but with groups of GROUP clusters drawn from the retriever's
    # top TOP (the recipe before session 21: 32:16), and alpha as trained (the recipe before session 22)
    PYTHONPATH=. python -m lab.reader_residual train HOME --steps 2000 --groups 32:16 --alpha trained
    # the product's groups and alpha, a reader of another shape (ReaderSpec's integer fields)
    PYTHONPATH=. python -m lab.reader_residual train HOME --steps 16000 --shape d=33 dv=32 hidden=128 context=7
    # the stored reader's alpha times F, set to A, or refitted on the held-out clusters' served lists (as training
    # now ends)
    PYTHONPATH=. python -m lab.reader_residual alpha HOME --times F
    PYTHONPATH=. python -m lab.reader_residual alpha HOME --to A
    PYTHONPATH=. python -m lab.reader_residual alpha HOME --held
"""

from __future__ import annotations

import argparse
import json
import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

import service.commands.reader as command
from cascade.embedding import EmbeddingIndex
from cascade.space import Space
from models.cluster_reader_store import load_reader, save_reader
from models.cluster_reader_training import Groups, fit_alpha


def _train(home: Path, steps: int, top: int, group: int, trained_alpha: bool, shape: dict) -> dict:
    """`prunecascade reader --steps N`'s training with other groups, optionally the alpha as trained instead of
    the held-out refit, and a reader of another shape."""
    args = Namespace(home=str(home), steps=steps, alone_steps=None, candidates=10, seed=0, threads=1)
    settings = command.settings_from(args)
    recipe = {"top": top, "group": group, "held_out_alpha": not trained_alpha}
    return command.train(settings.space_dir, settings.home, args, shape, **recipe)


def _alpha(home: Path, times: float | None, to: float | None, batches: int) -> dict:
    """Store the home's reader with its alpha times `times`, or set `to` a value, or (neither) refitted on
    `batches` x 64 held-out queries with the whole of the retriever's top 10 each."""
    args = Namespace(home=str(home), candidates=10)
    settings = command.settings_from(args)
    stored = load_reader(settings.space_dir)
    if stored is None:
        raise SystemExit(f"{settings.space_dir} holds no reader")
    model, before = stored.ranker, stored.ranker.reader.log_alpha.exp().item()
    out: dict = {"alpha_before": before}
    if times is not None:
        after = before * times
    elif to is not None:
        after = to
    else:
        retriever = EmbeddingIndex.load(settings.space_dir).encoder.eval()  # type: ignore[union-attr]
        prototypes = Space.load(settings.space_dir).meta.get("clusters") == "prototypes"
        train, held = command._prototype_sets(settings.home) if prototypes else command._user_sets(settings.home, args)
        rng = np.random.default_rng([0, 2])

        def fit(clusters) -> float:
            groups = Groups(clusters, retriever)
            return fit_alpha([groups.sample(64, 0, 10, rng, whole_top=True) for _ in range(batches)], model)

        after = fit(held)
        out["fit_on_training_clusters"] = fit(train)  # the retriever's own clusters, for comparison only
    with torch.no_grad():
        model.reader.log_alpha.fill_(math.log(after))
    digest = save_reader(model, stored.spec, settings.space_dir, extra={**stored.extra, "alpha_set_by_lab": after})
    return {**out, "alpha_after": after, "sha256": digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("home", type=Path)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--groups", default="10:11", help="TOP:GROUP")
    t.add_argument("--alpha", choices=["held", "trained"], default="held")
    t.add_argument(
        "--shape", nargs="*", default=[], metavar="FIELD=INT", help="ReaderSpec widths, e.g. d=33 dv=32 hidden=128"
    )
    a = sub.add_parser("alpha")
    a.add_argument("home", type=Path)
    how = a.add_mutually_exclusive_group(required=True)
    how.add_argument("--times", type=float)
    how.add_argument("--to", type=float)
    how.add_argument("--held", action="store_true")
    a.add_argument("--batches", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.what == "train":
        top, group = (int(v) for v in args.groups.split(":"))
        shape = command.parse_shape(args.shape)
        record = _train(args.home, args.steps, top, group, args.alpha == "trained", shape)
        print(json.dumps({k: v for k, v in record.items() if k != "trajectory"}))
    else:
        print(json.dumps(_alpha(args.home, args.times, args.to, args.batches)))


if __name__ == "__main__":
    main()
