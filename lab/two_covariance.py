"""A two-covariance (PLDA) scorer of a query against a cluster's members, over the retriever's own features.

Why: FAISS ranks by the squared distance from the query's embedding to a cluster's mean embedding, which treats
every direction of the embedding alike and the mean of ten noisy members as the cluster's exact centre. A
two-covariance model, fitted in closed form on the training clusters, learns which directions vary within a cluster
(W) and which between clusters (B), and scores a query by its predictive likelihood given the members:
log N(q; mu_post, W + S_post) with S_post = (B^-1 + n W^-1)^-1 and mu_post = S_post (B^-1 mu + n W^-1 m). It reads
the members together, is query-conditioned, and needs no gradient steps.

    PYTHONPATH=. OMP_NUM_THREADS=1 PRUNECASCADE_HOME=H python -m lab.two_covariance --feature emb hid
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from cascade.bootstrap import prototype_training_sets
from cascade.bootstrap_config import PairConfig
from lab.reranker_study import faiss_order, load_retriever, metrics
from models.biencoder import BiEncoder, embed_numpy
from models.prototypes import PrototypeConfig, make_prototype_set, make_queries


@torch.no_grad()
def features(model: BiEncoder, x: np.ndarray, kinds: list[str]) -> np.ndarray:
    """The named layers of the bi-encoder for every row, concatenated: raw input, pooled conv maps, hidden, the
    embedding before and after normalising."""
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    net = model.net
    for i in range(0, len(xt), 8192):
        h = xt[i : i + 8192]
        got = {"raw": h}
        for j, layer in enumerate(net):
            h = layer(h)
            got[f"l{j}"] = h
        got["pre"] = h
        got["emb"] = torch.nn.functional.normalize(h, dim=1)
        # hidden = the ReLU after the first Linear; conv = the last pooled map flattened
        lin = [j for j, m in enumerate(net) if isinstance(m, torch.nn.Linear)]
        got["hid"] = got[f"l{lin[0] + 1}"]
        got["conv"] = got[f"l{lin[0] - 1}"]
        for k in kinds:
            outs[k].append(got[k].reshape(len(got[k]), -1))
    return torch.cat([torch.cat(outs[k]) for k in kinds], dim=1).numpy().astype(np.float64)


class TwoCovariance:
    def __init__(self, f: np.ndarray, cluster: np.ndarray, shrink: float, dims: int) -> None:
        self.mean = f.mean(0)
        f = f - self.mean
        k = int(cluster.max()) + 1
        counts = np.bincount(cluster, minlength=k)
        mu = np.zeros((k, f.shape[1]))
        np.add.at(mu, cluster, f)
        mu /= counts[:, None]
        # whiten by the total covariance and keep its leading directions (regularises high-dimensional inputs)
        u, s, _ = np.linalg.svd(np.cov(f.T))
        keep = min(dims, int((s > 1e-9 * s[0]).sum()))
        self.proj = u[:, :keep] / np.sqrt(s[:keep])
        g, gm = f @ self.proj, mu @ self.proj
        r = g - gm[cluster]
        w = r.T @ r / (len(g) - k)
        n = counts.mean()
        b = np.cov(gm.T) - w / n
        ev, evec = np.linalg.eigh(b)
        b = (evec * np.maximum(ev, 1e-3 * ev.max())) @ evec.T
        w = (1 - shrink) * w + shrink * np.trace(w) / len(w) * np.eye(len(w))
        self.w, self.b = w, b

    def fit_space(self, f: np.ndarray, cluster: np.ndarray) -> None:
        g = (f - self.mean) @ self.proj
        k = int(cluster.max()) + 1
        counts = np.bincount(cluster, minlength=k)
        m = np.zeros((k, g.shape[1]))
        np.add.at(m, cluster, g)
        m /= counts[:, None]
        n = counts.mean()  # every cluster of the prototype space has the same size
        wi, bi = np.linalg.inv(self.w), np.linalg.inv(self.b)
        s_post = np.linalg.inv(bi + n * wi)
        self.mu_post = m @ (n * wi @ s_post).T
        self.prec = np.linalg.inv(self.w + s_post)

    def score(self, f: np.ndarray) -> np.ndarray:
        q = (f - self.mean) @ self.proj
        d = q[:, None, :] - self.mu_post[None]
        return -0.5 * np.einsum("qkd,de,qke->qk", d, self.prec, d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--feature", nargs="+", default=["emb"])
    ap.add_argument("--shrink", type=float, default=0.0)
    ap.add_argument("--dims", type=int, default=10_000)
    ap.add_argument("--M", type=int, default=50)
    ap.add_argument("--alphas", default="0,0.25,0.5,1,2,4")
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    retriever = load_retriever()
    pair = PairConfig()
    train, _ = prototype_training_sets(pair)
    t = time.perf_counter()
    model = TwoCovariance(features(retriever, train.x, args.feature), train.cluster, args.shrink, args.dims)
    space_cfg = PrototypeConfig(num_prototypes=2300)
    space = make_prototype_set(space_cfg, "space")
    model.fit_space(features(retriever, space.x, args.feature), space.cluster)
    fit_s = time.perf_counter() - t
    xq, cq, yq = make_queries(space_cfg, 500, seed=0)
    s = slice(1, None, 2) if args.split == "dev" else slice(0, None, 2)
    xq, cq, yq = xq[s], cq[s], yq[s]
    k = len(space.prototypes)
    emb = embed_numpy(retriever, space.x)
    mu = emb.reshape(k, -1, emb.shape[1]).mean(1)
    order, rscore = faiss_order(embed_numpy(retriever, xq), mu)
    sc = model.score(features(retriever, xq, args.feature))
    labels = space.prototypes.digit
    res = {"feature": args.feature, "shrink": args.shrink, "dims": model.proj.shape[1], "fit_s": round(fit_s, 1)}
    rows: dict[str, list] = {"faiss": [], "exhaustive": []}
    alphas = [float(a) for a in args.alphas.split(",")]
    for a in alphas:
        rows[f"top{args.M}_a{a}"] = []
    for i in range(len(xq)):
        grades = np.where(np.arange(k) == cq[i], 2, (labels == yq[i]).astype(np.int64))
        rows["faiss"].append(metrics(order[i], grades))
        rows["exhaustive"].append(metrics(np.argsort(-sc[i], kind="stable"), grades))
        top = order[i, : args.M]
        for a in alphas:
            key = sc[i, top] + a * rscore[i, top]
            rows[f"top{args.M}_a{a}"].append(
                metrics(np.concatenate([top[np.argsort(-key, kind="stable")], order[i, args.M :]]), grades)
            )
    res.update({n: [round(float(x), 3) for x in np.mean(v, 0)] for n, v in rows.items()})
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
