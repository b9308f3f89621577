"""Do the cluster reader and a pair model make different mistakes? The served reader's keys of FAISS's top 10
clusters (reader + its retriever residual) are added to beta x a pair model's (default the dense one) log-odds that a
cluster is the query's own (`mean_logit` over all its members, as the oracle aggregates), beta chosen on the dev
queries by recall@1 and reported once on the test queries. Where the blend beats the reader by much, serving both
pays; where it does not, the pair model adds nothing the reader lacks.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m lab.reader_pair_blend --home HOME --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from cascade.config import CONFIG_FILE, CascadeConfig
from cascade.engine import stage_log_posterior
from cascade.evaluation import example_queries
from cascade.reader import reader_keys
from cascade.snapshot import load_snapshot
from models.registry import ModelRegistry

WIDTH = 10
BETAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
GAMMAS = tuple(float(g) for g in np.logspace(-1, 3, 17))


def features(snapshot, split: str, variant: str) -> dict[str, np.ndarray]:
    """Per query: the reader's keys, the dense pair model's own-cluster log-odds and FAISS's order of the top
    WIDTH clusters, and where the own cluster sits among them (-1: not among them)."""
    dense = snapshot.variants[variant]
    keys, odds, dist, own = [], [], [], []
    offsets = snapshot.space.offsets
    for q in example_queries(snapshot, WIDTH, None, split):
        target = q.target(snapshot)
        clusters = target.candidates[:WIDTH]
        keys.append(reader_keys(snapshot, target, WIDTH)[0].numpy())
        centroids = snapshot.embedding.index.centroids(clusters)
        dist.append(-((centroids - target.embeddings[0]) ** 2).sum(1))
        rows = np.concatenate([np.arange(offsets[c], offsets[c + 1]) for c in clusters])
        counts = torch.from_numpy(np.diff(offsets)[clusters].astype(np.int64))
        x = snapshot.item_inputs(dense, torch.from_numpy(rows))
        with torch.inference_mode():
            lp = stage_log_posterior(dense, "mean_logit", target.queries, x, counts, inputs=True)
        odds.append((lp[:, -1] - torch.logsumexp(lp[:, :-1], dim=1)).numpy())
        hit = np.flatnonzero(clusters == q.info["cluster"])
        own.append(int(hit[0]) if len(hit) else -1)
    return {"keys": np.array(keys), "odds": np.array(odds), "faiss": np.array(dist), "own": np.array(own)}


def hits(f: dict[str, np.ndarray], beta: float, reader: float = 1.0, gamma: float = 0.0) -> np.ndarray:
    """Recall@1 per query of ranking the top WIDTH by reader x keys + beta x log-odds + gamma x FAISS's score
    (all three 0: FAISS's order)."""
    score = reader * f["keys"] + beta * f["odds"] + gamma * f["faiss"]
    if reader == 0.0 and beta == 0.0 and gamma == 0.0:
        first = np.zeros(len(score), dtype=np.int64)
    else:
        first = score.argmax(1)
    return (first == f["own"]).astype(np.float64)


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = a - b
    return {"diff": round(float(d.mean()), 4), "se": round(float(d.std(ddof=1) / math.sqrt(len(d))), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", default=None, help="the pair model blended in (default: the dense one)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    home = Path(args.home)
    config = CascadeConfig.load(home / CONFIG_FILE)
    snapshot = load_snapshot(ModelRegistry(home / "registry"), home / "spaces" / "default", config)
    assert snapshot.reader is not None, "the home serves no cluster reader"
    variant = args.variant or config.pair_dense
    out: dict = {"home": str(home), "reader": snapshot.reader.sha256[:8], "pair model": variant}
    data = {split: features(snapshot, split, variant) for split in ("dev", "test")}
    dev = data["dev"]
    out["dev"] = {str(b): round(float(hits(dev, b).mean()), 4) for b in BETAS}
    out["dev"]["faiss"] = round(float(hits(dev, 0.0, 0.0).mean()), 4)
    out["dev"]["pair alone"] = round(float(hits(dev, 1.0, reader=0.0).mean()), 4)
    gamma = max(GAMMAS, key=lambda g: (hits(dev, 1.0, 0.0, g).mean(), -g))
    out["gamma"] = gamma
    out["dev"]["pair + gamma x FAISS"] = round(float(hits(dev, 1.0, 0.0, gamma).mean()), 4)
    best = max(BETAS, key=lambda b: (hits(dev, b).mean(), -b))
    out["beta"] = best
    test = data["test"]
    faiss, reader, blend = hits(test, 0.0, 0.0), hits(test, 0.0), hits(test, best)
    out["test"] = {
        "faiss": round(float(faiss.mean()), 4),
        "reader": round(float(reader.mean()), 4),
        "pair alone": round(float(hits(test, 1.0, reader=0.0).mean()), 4),
        "pair + gamma x FAISS": round(float(hits(test, 1.0, 0.0, gamma).mean()), 4),
        "blend": round(float(blend.mean()), 4),
        "blend - reader": paired(blend, reader),
        "reader - faiss": paired(reader, faiss),
        "own in top 10": round(float((test["own"] >= 0).mean()), 4),
    }
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
