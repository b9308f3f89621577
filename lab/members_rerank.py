"""The members-only ceiling's scores (saved by `lab.members_ceiling` to /tmp/rr3_members_{variant}_{split}.npy) as a
reranker of the retriever's FAISS top M (ranked by expected gain), on the same queries.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m lab.members_rerank --split test
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.special import logsumexp

from lab.ceiling import expected_gains
from lab.reranker_study import faiss_order, load_retriever, metrics
from models.biencoder import embed_numpy
from models.prototypes import PrototypeConfig, make_prototype_set, make_queries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test", choices=["test", "dev"])
    args = ap.parse_args()
    cfg = PrototypeConfig(num_prototypes=2300)
    sp = make_prototype_set(cfg)
    labels = sp.prototypes.digit
    xq, cq, yq = make_queries(cfg, 500, seed=0)
    s = slice(0, None, 2) if args.split == "test" else slice(1, None, 2)
    xq, cq, yq = xq[s], cq[s], yq[s]
    ret = load_retriever()
    mu = embed_numpy(ret, sp.x).reshape(2300, 10, -1).mean(1)
    order, _ = faiss_order(embed_numpy(ret, xq), mu)
    for variant in ("estimated", "oracle"):
        ll = np.load(f"/tmp/rr3_members_{variant}_{args.split}.npy")
        eg = expected_gains(ll - logsumexp(ll, 1, keepdims=True), labels)
        for m in (50, 200):
            rows = []
            for i in range(len(xq)):
                top = order[i, :m]
                grades = np.where(np.arange(2300) == cq[i], 2, (labels == yq[i]).astype(np.int64))
                rows.append(
                    metrics(np.concatenate([top[np.argsort(-eg[i, top], kind="stable")], order[i, m:]]), grades)
                )
            print(variant, f"rerank of FAISS top {m}: R@1, R@10, nDCG@10", np.mean(rows, 0).round(3).tolist())


if __name__ == "__main__":
    main()
