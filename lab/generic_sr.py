"""Generic least-squares super-resolution of a cluster (no generator knowledge beyond "1-D signals sampled by
linear interpolation from a finer grid of G points, members shifted by whole fine steps"): the template u on the
fine grid is the ridge least-squares fit of all members at their shifts (forward model R S_d u, R the linear
resampling G -> D), shifts re-assigned by residual, alternately; the per-position noise variance is the members'
leave-in residual variance mapped to the fine grid and smoothed. A query is scored by a diagonal Gaussian around
R S_s u, log-sum-exp over the shifts s within the members' range +- margin.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m lab.generic_sr --grid 72
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from scipy.ndimage import gaussian_filter1d

from lab.ceiling import _resample_matrix


def fit_cluster(x: np.ndarray, rmat: np.ndarray, max_shift: int, ridge: float, iters: int = 4, smooth: float = 1.5):
    n, dd = x.shape
    g = rmat.shape[1]
    shifts = np.arange(-max_shift, max_shift + 1)
    # initial shifts: members upsampled to the fine grid, cross-correlated with the aligned mean
    up = np.stack([np.interp(np.linspace(0, 1, g), np.linspace(0, 1, dd), row) for row in x])
    up = up - up.mean(1, keepdims=True)
    rolls = np.stack([np.roll(up, -s, axis=1) for s in shifts], 1)  # (n, S, g)
    ref = up[0]
    for _ in range(3):
        d = shifts[np.argmax((rolls * ref).sum(-1), 1)]
        d = np.clip(d - int(np.round(np.median(d))), -max_shift, max_shift)
        ref = np.stack([np.roll(row, -s) for row, s in zip(up, d, strict=True)]).mean(0)
    # R S_s for every shift: (S, D, g); S_s u = roll(u, s)
    ops = np.stack([np.roll(rmat, -s, axis=1) for s in shifts])  # R @ roll(u, s) == roll(R, -s, axis=1) @ u
    lap = np.diff(np.eye(g), 2, axis=0)
    reg = ridge * lap.T @ lap + 1e-6 * np.eye(g)
    for _ in range(iters):
        a = ops[d + max_shift]  # (n, D, g)
        h = np.einsum("ndk,ndl->kl", a, a) + reg
        u = np.linalg.solve(h, np.einsum("ndk,nd->k", a, x))
        cost = ((x[:, None, :] - (ops @ u)[None]) ** 2).sum(-1)  # (n, S)
        nd = shifts[np.argmin(cost, 1)]
        nd = np.clip(nd - int(np.round(np.median(nd))), -max_shift, max_shift)
        if (nd == d).all():
            break
        d = nd
    a = ops[d + max_shift]
    res2 = (x - a @ u) ** 2  # (n, D)
    num = np.einsum("ndk,nd->k", np.abs(a), res2)
    den = np.einsum("ndk->k", np.abs(a))
    v = gaussian_filter1d(num, smooth, mode="wrap") / np.maximum(gaussian_filter1d(den, smooth, mode="wrap"), 1e-9)
    v *= n / max(n - 1, 1)  # leave-in residuals shrink by about (n-1)/n... rough correction
    return u, v, d, ops


def score(q: np.ndarray, u, v, d, ops, max_shift: int, lam: float, margin: int) -> float:
    shifts = np.arange(-max_shift, max_shift + 1)
    ok = (shifts >= d.min() - margin) & (shifts <= d.max() + margin)
    mean = ops[ok] @ u  # (S', D)
    var = ops[ok] @ v + lam
    ll = -0.5 * (((q - mean) ** 2) / var + np.log(var)).sum(-1)
    m = ll.max()
    return m + np.log(np.exp(ll - m).sum())


def main() -> None:
    from lab.reranker_study import faiss_order, load_retriever
    from models.biencoder import embed_numpy
    from models.prototypes import PrototypeConfig, make_prototype_set, make_queries

    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=72)
    ap.add_argument("--max-shift", type=int, default=6)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--M", type=int, default=50)
    args = ap.parse_args()
    cfg = PrototypeConfig(num_prototypes=2300)
    sp = make_prototype_set(cfg, "space")
    xq, cq, _ = make_queries(cfg, 500, seed=0)
    s = slice(1, None, 2) if args.split == "dev" else slice(0, None, 2)
    xq, cq = xq[s], cq[s]
    ret = load_retriever()
    k = 2300
    mu = embed_numpy(ret, sp.x).reshape(k, 10, -1).mean(1)
    order, rscore = faiss_order(embed_numpy(ret, xq), mu)
    print("faiss", np.mean(order[:, 0] == cq), flush=True)
    rmat = _resample_matrix(args.grid, 40)
    # only the clusters some query's top M needs
    need = np.unique(order[:, : args.M])
    for ridge, smooth in ((0.1, 0.7), (0.03, 0.5)):
        t0 = time.perf_counter()
        fits = {
            c: fit_cluster(sp.x[c * 10 : (c + 1) * 10].astype(np.float64), rmat, args.max_shift, ridge, smooth=smooth)
            for c in need
        }
        print(f"ridge {ridge} smooth {smooth}: {len(need)} clusters in {time.perf_counter() - t0:.1f}s", flush=True)
        for lam, margin in itertools.product((0.0003, 0.001), (0,)):
            scs = [
                np.array(
                    [score(xq[i].astype(np.float64), *fits[c], args.max_shift, lam, margin) for c in order[i, : args.M]]
                )
                for i in range(len(xq))
            ]
            for alpha in (0.0, 1.0, 3.0, 10.0, 30.0, 100.0):
                hits = [
                    order[i, int(np.argmax(scs[i] + alpha * rscore[i, order[i, : args.M]]))] == cq[i]
                    for i in range(len(xq))
                ]
                print(args.grid, ridge, smooth, lam, margin, alpha, np.mean(hits), flush=True)


if __name__ == "__main__":
    main()
