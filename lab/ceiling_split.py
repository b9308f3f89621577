"""The generator ceiling (`lab.ceiling.measure`) and FAISS alone on one split of the default space's shipped
queries (make_queries(space, 500, seed 0): test = even positions, dev = odd), with the home's retriever.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m lab.ceiling_split --split test
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from lab.ceiling import measure
from lab.reranker_study import faiss_order, load_retriever, metrics
from models.biencoder import embed_numpy
from models.prototypes import PrototypeConfig, make_prototype_set, make_queries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test", choices=["test", "dev"])
    args = ap.parse_args()
    config = PrototypeConfig(num_prototypes=2300)
    xq, cq, yq = make_queries(config, 500, seed=0)
    s = slice(0, None, 2) if args.split == "test" else slice(1, None, 2)
    xq, cq, yq = xq[s], cq[s], yq[s]
    space = make_prototype_set(config, "space")
    ret = load_retriever()
    emb = embed_numpy(ret, space.x)
    k = len(space.prototypes)
    mu = emb.reshape(k, 10, -1).mean(1)
    order, _ = faiss_order(embed_numpy(ret, xq), mu)
    labels = space.prototypes.digit
    rows = [
        metrics(order[i], np.where(np.arange(k) == cq[i], 2, (labels == yq[i]).astype(np.int64)))
        for i in range(len(xq))
    ]
    out = {"faiss": dict(zip(("r1", "r10", "ndcg10"), np.mean(rows, 0).round(3).tolist(), strict=True))}
    ceil, _ = measure(config, xq, cq, yq)
    out.update({name: {k2: round(v, 3) for k2, v in m.items()} for name, m in ceil.items()})
    print(args.split, json.dumps(out))


if __name__ == "__main__":
    main()
