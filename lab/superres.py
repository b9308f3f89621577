"""Shift-and-add super-resolution of a cluster's members (generic for 1-D signals): each member is placed on a
grid U times finer at its estimated sub-sample shift, the cluster's template is the normalised convolution of the
placed samples, shifts are re-estimated against the template, alternately; the spread of the members around the
template (per fine position, smoothed) is the cluster's reliability. A query is compared with the template
sampled at every fine shift.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m lab.superres   (dev-query grid of the hand-set scorer)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _kernel(factor: int, sigma: float) -> torch.Tensor:
    half = int(np.ceil(3 * sigma))
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum())[None, None]


def _circ_conv(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, L) circular convolution with a (1,1,W) kernel."""
    half = k.shape[-1] // 2
    xp = torch.cat([x[:, -half:], x, x[:, :half]], dim=1) if half else x
    return F.conv1d(xp[:, None], k)[:, 0]


def place(x: torch.Tensor, d: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (K, n, D), shifts d (K, n) in fine steps -> sums and counts (K, D*factor) of the members' samples placed
    at fine position k*factor - d (mod D*factor)."""
    kk, _, dd = x.shape
    lf = dd * factor
    pos = (torch.arange(dd)[None, None, :] * factor - d[:, :, None]) % lf  # (K, n, D)
    sums = torch.zeros(kk, lf, dtype=x.dtype).scatter_add_(1, pos.reshape(kk, -1), x.reshape(kk, -1))
    counts = torch.zeros(kk, lf, dtype=x.dtype).scatter_add_(1, pos.reshape(kk, -1), torch.ones_like(x).reshape(kk, -1))
    return sums, counts


def sample_at(u: torch.Tensor, shifts: torch.Tensor, factor: int, dd: int) -> torch.Tensor:
    """u (K, Lf), shifts (S,) -> (K, S, D): u at fine positions k*factor - s."""
    lf = u.shape[1]
    pos = (torch.arange(dd)[None, :] * factor - shifts[:, None]) % lf  # (S, D)
    return u[:, pos]


@torch.no_grad()
def super_resolve(
    members: torch.Tensor,
    factor: int = 4,
    max_shift: int = 14,
    iters: int = 4,
    sigma: float | None = None,
    v_sigma: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """members (K, n, D) -> template u (K, D*factor), residual variance v (K, D*factor), shifts d (K, n)."""
    x = members.double()
    kk, n, dd = x.shape
    ker = _kernel(factor, sigma if sigma is not None else factor / 2)
    shifts = torch.arange(-max_shift, max_shift + 1)
    # initial shifts: every member against member 0, upsampled linearly
    up = F.interpolate(x.reshape(-1, 1, dd), size=dd * factor, mode="linear", align_corners=False).reshape(kk, n, -1)
    up = up - up.mean(-1, keepdim=True)
    cand = torch.stack([torch.roll(up, int(s), dims=-1) for s in shifts], dim=2)  # (K, n, S, Lf): roll right by s
    ref = up[:, :1]
    d = torch.zeros(kk, n, dtype=torch.long)
    for _ in range(3):
        score = (cand * ref[:, :, None]).sum(-1)
        d = shifts[score.argmax(-1)]
        d = d - d.median(1, keepdim=True).values
        ref = _aligned_mean(up, d)
    for _ in range(iters):
        sums, counts = place(x, d, factor)
        u = _circ_conv(sums, ker) / _circ_conv(counts, ker).clamp_min(1e-9)
        pred = sample_at(u, shifts, factor, dd)  # (K, S, D)
        cost = ((x[:, :, None, :] - pred[:, None]) ** 2).sum(-1)  # (K, n, S)
        d = shifts[cost.argmin(-1)]
        d = d - d.median(1, keepdim=True).values
    sums, counts = place(x, d, factor)
    u = _circ_conv(sums, ker) / _circ_conv(counts, ker).clamp_min(1e-9)
    # leave-one-out residuals: each member against the template without it
    lf = dd * factor
    pos = (torch.arange(dd)[None, None, :] * factor - d[:, :, None]) % lf
    r2 = torch.zeros(kk, lf, dtype=x.dtype)
    cnt = torch.zeros(kk, lf, dtype=x.dtype)
    for i in range(n):
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        s_i, c_i = place(x[:, keep], d[:, keep], factor)
        u_i = _circ_conv(s_i, ker) / _circ_conv(c_i, ker).clamp_min(1e-9)
        res = x[:, i] - torch.gather(u_i, 1, pos[:, i])
        r2.scatter_add_(1, pos[:, i], res**2)
        cnt.scatter_add_(1, pos[:, i], torch.ones_like(res))
    wide = _kernel(factor, v_sigma if v_sigma is not None else 2.0 * factor)
    v = _circ_conv(r2, wide) / _circ_conv(cnt, wide).clamp_min(1e-9)
    return u.float(), v.float(), d


def _aligned_mean(up: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Members rolled left by their shifts, averaged: (K, 1, Lf)."""
    lf = up.shape[2]
    idx = (torch.arange(lf)[None, None, :] + d[:, :, None]) % lf
    return torch.gather(up, 2, idx).mean(1, keepdim=True)


def score(
    q: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    factor: int,
    max_shift: int,
    lam: float,
    temp: float = 1.0,
    d: torch.Tensor | None = None,
    margin: int | None = None,
) -> torch.Tensor:
    """q (D,) against K templates: log-sum-exp over fine shifts of a diagonal Gaussian log-likelihood; with the
    members' shifts d (K, n) and a margin, only query shifts within [min d - margin, max d + margin]."""
    dd = q.shape[0]
    shifts = torch.arange(-max_shift, max_shift + 1)
    pred = sample_at(u, shifts, factor, dd)  # (K, S, D)
    var = sample_at(v, shifts, factor, dd) + lam
    ll = -0.5 * (((q[None, None] - pred) ** 2) / var + var.log()).sum(-1)
    if d is not None and margin is not None:
        lo, hi = d.min(1).values - margin, d.max(1).values + margin
        ok = (shifts[None] >= lo[:, None]) & (shifts[None] <= hi[:, None])
        ll = ll.masked_fill(~ok, -1e9)
    return torch.logsumexp(temp * ll, -1)


if __name__ == "__main__":
    import itertools

    from lab.reranker_study import faiss_order, load_retriever
    from models.biencoder import embed_numpy
    from models.prototypes import PrototypeConfig, make_prototype_set, make_queries

    torch.set_num_threads(1)
    ret = load_retriever()
    cfg = PrototypeConfig(num_prototypes=2300)
    sp = make_prototype_set(cfg, "space")
    xq, cq, yq = make_queries(cfg, 500, seed=0)
    s = slice(1, None, 2)
    xq, cq = xq[s], cq[s]
    k = 2300
    emb = embed_numpy(ret, sp.x)
    mu = emb.reshape(k, 10, -1).mean(1)
    order, _ = faiss_order(embed_numpy(ret, xq), mu)
    print("faiss", np.mean(order[:, 0] == cq), flush=True)
    import time

    factor = 4
    for sigma, v_sigma in ((1.0, 2.0), (0.7, 4.0), (1.0, 4.0), (2.0, 8.0)):
        t0 = time.perf_counter()
        u, v, d = super_resolve(torch.from_numpy(sp.x.reshape(k, 10, 40)), factor, 16, sigma=sigma, v_sigma=v_sigma)
        print(f"sigma {sigma} v_sigma {v_sigma}: {time.perf_counter() - t0:.1f}s", flush=True)
        for lam, margin in itertools.product((0.005, 0.02, 0.05), (None, 2, 5)):
            hits = []
            for i in range(len(xq)):
                top = order[i, :50]
                sc = score(torch.from_numpy(xq[i]), u[top], v[top], factor, 16, lam, 1.0, d[top], margin).numpy()
                hits.append(top[np.argmax(sc)] == cq[i])
            print(sigma, v_sigma, lam, margin, np.mean(hits), flush=True)
