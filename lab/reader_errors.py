"""Where a cluster reader ranks a wrong cluster first on the dev queries: how that cluster's prototype differs from
the query's own (digit, translation, padding, scale, shear: the generator's parameters, known on the prototype
space), against the same differences for FAISS's wrong first clusters. A parameter the reader's mistakes keep close
to the truth, against the same-digit wrong clusters among its candidates, is one it resolves badly.

    PYTHONPATH=. OMP_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1 PRUNECASCADE_HOME=/work/homes/h3 \\
        python -m lab.reader_errors RUN.json --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from cascade.bootstrap import prototype_training_sets
from cascade.bootstrap_config import PairConfig
from lab.reader_ensemble import load_run
from lab.reranker_study import faiss_order, load_retriever
from models.biencoder import embed_numpy
from models.prototypes import PrototypeConfig, make_prototype_set, make_queries


def differences(protos, own: np.ndarray, first: np.ndarray) -> dict[str, list[float]]:
    """Per pair (own, first): same digit, |translation difference| on the circular 72-sample grid, |padding
    difference|, |log scale ratio| and |shear difference|."""
    grid = protos.config.grid_length
    dt = np.abs(protos.translation[own] - protos.translation[first]) % grid
    return {
        "same_digit": (protos.digit[own] == protos.digit[first]).astype(float).tolist(),
        "translation": np.minimum(dt, grid - dt).astype(float).tolist(),
        "padding": np.abs(protos.padding[own] - protos.padding[first]).astype(float).tolist(),
        "log_scale": np.abs(np.log(protos.scale[own] / protos.scale[first])).tolist(),
        "shear": np.abs(protos.shear[own] - protos.shear[first]).tolist(),
    }


def describe(d: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(float(np.median(v)) if k != "same_digit" else float(np.mean(v)), 4) for k, v in d.items()} | {
        "n": len(d["same_digit"])
    }


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--M", type=int, default=50)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("PRUNECASCADE_TORCH_THREADS", "1")))
    retriever = load_retriever()
    train, _ = prototype_training_sets(PairConfig())
    model = load_run(args.run, retriever, torch.from_numpy(train.x[:: max(1, len(train.x) // 4000)]))
    cfg = PrototypeConfig(num_prototypes=2300)
    xq, cq, _ = make_queries(cfg, 500, seed=0)
    xq, cq = xq[1::2], cq[1::2]  # dev
    space = make_prototype_set(cfg, "space")
    k, views = len(space.prototypes), cfg.views
    mu = embed_numpy(retriever, space.x).reshape(k, views, -1).mean(1)
    order, rscore = faiss_order(embed_numpy(retriever, xq), mu)
    xs = torch.from_numpy(space.x.reshape(k, views, -1))
    top = order[:, : args.M]
    firsts = []
    for i0 in range(0, len(xq), 10):
        idx = slice(i0, i0 + 10)
        rs = torch.from_numpy(np.take_along_axis(rscore[idx], top[idx], 1).astype(np.float32))
        keys = model.scores(torch.from_numpy(xq[idx]), xs[torch.from_numpy(top[idx])], rs).numpy()
        firsts.append(np.take_along_axis(top[idx], keys.argmax(1)[:, None], 1)[:, 0])
    reader_first, faiss_first = np.concatenate(firsts), order[:, 0]
    out = {"run": args.run}
    for name, first in (("reader", reader_first), ("faiss", faiss_first)):
        wrong = first != cq
        out[name] = {
            "r1": round(float(1 - wrong.mean()), 4),
            **describe(differences(space.prototypes, cq[wrong], first[wrong])),
        }
        print(name, json.dumps(out[name]), flush=True)
    # every same-digit wrong cluster among the candidates the reader read: what a look-alike typically differs by
    rows, cols = np.nonzero((space.prototypes.digit[top] == space.prototypes.digit[cq][:, None]) & (top != cq[:, None]))
    out["same_digit_candidates"] = describe(differences(space.prototypes, cq[rows], top[rows, cols]))
    print("same-digit candidates", json.dumps(out["same_digit_candidates"]), flush=True)
    both = (reader_first != cq) & (faiss_first != cq)
    out["both_wrong"] = int(both.sum())
    out["reader_wrong_faiss_right"] = int(((reader_first != cq) & (faiss_first == cq)).sum())
    out["same_wrong_cluster"] = int((both & (reader_first == faiss_first)).sum())
    print(json.dumps({k: out[k] for k in ("both_wrong", "reader_wrong_faiss_right", "same_wrong_cluster")}))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
