"""How much FAISS alone gains from training stage 0 longer or wider: the bootstrap's bi-encoder recipe
(`train_biencoder` on `prototype_training_sets(PairConfig())`, seed 0) at several step budgets and widths, each
measured on the default space's shipped queries (dev = odd positions, test = even; recall@1, recall@10, graded
nDCG@10 of FAISS alone, squared L2 to each cluster's mean embedding) with its training seconds.

    PYTHONPATH=. OMP_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1 python -m lab.biencoder_steps \\
        1000:32,64:128:64 3000:32,64:128:64 5000:32,64:128:64 1500:64,128:256:128

Each run is STEPS:CHANNELS:HIDDEN:EMBED.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import numpy as np
import torch

from cascade.bootstrap import prototype_training_sets
from cascade.bootstrap_config import PairConfig
from lab.reranker_study import faiss_order, metrics
from models.biencoder import BiEncoderSpec, embed_numpy
from models.biencoder_training import train_biencoder
from models.prototypes import make_prototype_set, make_queries

SPLITS = {"dev": slice(1, None, 2), "test": slice(0, None, 2)}


def faiss_alone(model, space, xq: np.ndarray, cq: np.ndarray, yq: np.ndarray) -> tuple[float, float, float]:
    """Mean recall@1, recall@10 and nDCG@10 of the clusters ranked by distance to their mean embedding."""
    k, views = len(space.prototypes), space.prototypes.config.views
    mu = embed_numpy(model, space.x).reshape(k, views, -1).mean(1)
    order, _ = faiss_order(embed_numpy(model, xq), mu)
    digits = space.prototypes.digit
    rows = [
        metrics(order[i], np.where(np.arange(k) == cq[i], 2, (digits == yq[i]).astype(np.int64)))
        for i in range(len(xq))
    ]
    return tuple(round(float(v), 4) for v in np.mean(rows, 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="STEPS:CHANNELS:HIDDEN:EMBED, e.g. 3000:32,64:128:64")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("PRUNECASCADE_TORCH_THREADS", "1")))
    pair = PairConfig()
    train, val = prototype_training_sets(pair)
    space = make_prototype_set(pair.space, "space")
    xq, cq, yq = make_queries(pair.space, pair.queries, seed=0)
    print("| steps | channels | hidden | embedding | train s (one thread) | load | dev R@1 / R@10 / nDCG@10 | test |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        steps, channels, hidden, embed = run.split(":")
        spec = BiEncoderSpec(40, tuple(int(c) for c in channels.split(",")), 5, int(hidden), int(embed))
        load = os.getloadavg()[0]
        started = time.perf_counter()
        model = train_biencoder(train, val, replace(pair.biencoder, steps=int(steps), seed=0), spec=spec)
        seconds = time.perf_counter() - started
        got = {s: faiss_alone(model, space, xq[sl], cq[sl], yq[sl]) for s, sl in SPLITS.items()}
        row = f"| {steps} | {channels} | {hidden} | {embed} | {seconds:.0f} | {load:.1f} | "
        print(row + " / ".join(map(str, got["dev"])) + " | " + " / ".join(map(str, got["test"])) + " |", flush=True)
        print(json.dumps({"run": run, "seconds": round(seconds, 1), "load": load, **got}), flush=True)


if __name__ == "__main__":
    main()
