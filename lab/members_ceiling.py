"""A members-only ceiling: how well can a scorer do that knows each cluster only through its 10 stored members
(not its prototype), but knows the generator's noise model?

Per cluster, the prototype's 72-grid template u (a contiguous block of unknown start a and length L, zeros
elsewhere), its shear and the members' relative jitters d_i are estimated by profile likelihood under the
generator's Gaussian noise model (`lab/ceiling.py`): given (a, L, d), u and the shear are a generalised least
squares fit of the members; (a, L) are searched around the block where the aligned, upsampled members agree, and
d is re-assigned member by member, alternately. A query is then scored by its posterior predictive likelihood:
jitter marginalised over the relative shifts the members' own jitters allow, and the uncertainty of the fitted
(u, shear) added to the covariance. Variant `oracle`: the true relative jitters and block (only u and the shear
estimated from the members) -- close to the best a members-only scorer can do.

This is a yardstick that knows the generator, not a design.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m lab.members_ceiling --queries 500 --split test
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy.special import logsumexp

from lab.ceiling import _filter_matrix, _resample_matrix, ceiling_metrics, expected_gains
from models.prototypes import PrototypeConfig, make_prototypes, make_queries, views_rng

LENGTHS = np.arange(12, 20)
MAX_D = 6


class Model:
    def __init__(self, config: PrototypeConfig):
        self.c = config
        g, d = config.grid_length, config.final_seq_length
        self.g, self.d = g, d
        self.R = _resample_matrix(g, d)  # (D, g)
        self.rlin = self.R @ np.linspace(-0.5, 0.5, g)
        fmat = config.corr_noise_scale * _filter_matrix(g)
        iid = config.iid_noise_scale**2 * (self.R @ self.R.T)
        # precision and logdet for every block (start a, length L): raw (un-normalised) units
        self.prec = np.empty((len(LENGTHS), g, d, d))
        self.logdet = np.empty((len(LENGTHS), g))
        self.chol = np.empty((len(LENGTHS), g, d, d))
        for li, length in enumerate(LENGTHS):
            for a in range(g):
                free = np.ones(g)
                free[(a + np.arange(length)) % g] = 0
                corr = (self.R * free[None, :]) @ fmat
                cov = corr @ corr.T + iid
                ch = np.linalg.cholesky(cov)
                self.chol[li, a] = ch
                self.logdet[li, a] = 2 * np.log(np.diag(ch)).sum()
                self.prec[li, a] = np.linalg.inv(cov)

    def raw(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64) * self.c.norm_std + self.c.norm_mean

    def design(self, a: int, length: int, d: np.ndarray) -> np.ndarray:
        """(n, D, L+1): member i's mean is A_i @ [u_block, shear]."""
        cols = (a + d[:, None] + np.arange(length)[None, :]) % self.g  # (n, L)
        a_mat = self.R[:, cols].transpose(1, 0, 2)  # (n, D, L)
        ramp = np.broadcast_to(-self.rlin[None, :, None], (len(d), self.d, 1))
        return np.concatenate([a_mat, ramp], axis=2)

    def fit(self, y: np.ndarray, a: int, length: int, d: np.ndarray):
        li = length - LENGTHS[0]
        am = self.design(a, length, d)
        p = self.prec[li, (a + d) % self.g]  # (n, D, D)
        pa = p @ am
        h = np.einsum("ndk,ndl->kl", am, pa)
        gv = np.einsum("ndk,nd->k", pa, y)
        h += 1e-6 * np.eye(len(h))
        theta = np.linalg.solve(h, gv)
        r = y - am @ theta
        nll = 0.5 * np.einsum("nd,nde,ne->", r, p, r) + 0.5 * self.logdet[li, (a + d) % self.g].sum()
        return nll, theta, h

    def member_nll(self, y: np.ndarray, a: int, length: int, theta: np.ndarray, shifts: np.ndarray) -> np.ndarray:
        """(n, S): each member's nll at each relative shift."""
        li = length - LENGTHS[0]
        am = self.design(a, length, shifts)  # (S, D, L+1)
        mean = am @ theta  # (S, D)
        p = self.prec[li, (a + shifts) % self.g]
        r = y[:, None, :] - mean[None]  # (n, S, D)
        return 0.5 * np.einsum("nsd,sde,nse->ns", r, p, r) + 0.5 * self.logdet[li, (a + shifts) % self.g][None]


def upsample(y: np.ndarray, g: int) -> np.ndarray:
    src = np.linspace(0, 1, y.shape[1])
    dst = np.linspace(0, 1, g)
    return np.stack([np.interp(dst, src, row) for row in y])


def _init_shifts(up: np.ndarray, ref: int, shifts: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Relative shifts by cross-correlation with member `ref`, then `rounds` of re-aligning every member to the
    mean of the aligned members (template refinement)."""

    def align(target):
        return np.array([shifts[np.argmax([np.dot(np.roll(row, -s), target) for s in shifts])] for row in up])

    d = align(up[ref])
    for _ in range(rounds):
        d -= int(np.round(np.median(d)))
        mean = np.stack([np.roll(row, -s) for row, s in zip(up, d, strict=True)]).mean(0)
        d = align(mean)
    return d - int(np.round(np.median(d)))


def estimate(model: Model, y: np.ndarray, iters: int = 5, refs: tuple[int, ...] = (0, 3, 6)):
    """(a, L, d, theta, H) for one cluster's raw members y (n, D): the best of restarts from several references."""
    g = model.g
    up = upsample(y, g)
    up = up - up.mean(1, keepdims=True)
    shifts = np.arange(-MAX_D, MAX_D + 1)
    overall = None
    seen = set()
    for ref in refs:
        d = _init_shifts(up, ref, shifts)
        if tuple(d) in seen:
            continue
        seen.add(tuple(d))
        best = None
        for _ in range(iters):
            aligned = np.stack([np.roll(row, -s) for row, s in zip(up, d, strict=True)])
            var = aligned.var(0)
            win = np.array([var[(a + np.arange(15)) % g].sum() for a in range(g)])
            a0 = int(np.argmin(win))
            cands = []
            for a in range(a0 - 6, a0 + 7):
                for length in LENGTHS:
                    nll, theta, h = model.fit(y, a % g, int(length), d)
                    cands.append((nll + 0.5 * np.log(len(y) * model.d) * (length + 1), a % g, int(length), theta, h))
            cur = min(cands, key=lambda t: t[0])
            if best is not None and cur[0] >= best[0] - 1e-6:
                break
            best = (*cur, d.copy())
            _, a, length, theta, _ = cur
            nd = model.member_nll(y, a, length, theta, shifts)
            d = shifts[np.argmin(nd, axis=1)]
        if overall is None or best[0] < overall[0]:
            overall = best
    _, a, length, theta, h, d = overall
    return a, length, d, theta, h


def jitter_weights(d: np.ndarray, jitter: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative query shifts and their predictive probabilities given the members' relative shifts d."""
    j0 = [j for j in range(-jitter, jitter + 1) if (d + j >= -jitter).all() and (d + j <= jitter).all()]
    if not j0:  # inconsistent estimates: fall back to the widest window
        j0 = [0]
    shifts = np.arange(-2 * jitter - MAX_D, 2 * jitter + MAX_D + 1)
    w = np.zeros(len(shifts))
    for j in j0:
        w += ((shifts + j >= -jitter) & (shifts + j <= jitter)) / (2 * jitter + 1)
    keep = w > 0
    return shifts[keep], w[keep] / len(j0)


def score_queries(model: Model, yq: np.ndarray, est, jitter: int) -> np.ndarray:
    """(Q,) log predictive likelihood of raw queries yq (Q, D) under one cluster's estimate."""
    a, length, d, theta, h = est
    shifts, w = jitter_weights(d, jitter)
    li = length - LENGTHS[0]
    am = model.design(a, length, shifts)  # (S, D, L+1)
    mean = am @ theta
    hinv = np.linalg.inv(h)
    out = []
    for s in range(len(shifts)):
        aa = (a + shifts[s]) % model.g
        ch = model.chol[li, aa]
        cov = ch @ ch.T + am[s] @ hinv @ am[s].T
        c2 = np.linalg.cholesky(cov)
        white = np.linalg.solve(c2, (yq - mean[s]).T)
        out.append(-0.5 * (white**2).sum(0) - np.log(np.diag(c2)).sum() + np.log(w[s]))
    out = np.stack(out)
    m = out.max(0)
    return m + np.log(np.exp(out - m).sum(0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prototypes", type=int, default=2300)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--split", default="test", choices=["test", "dev", "all"])
    ap.add_argument("--limit", type=int, default=0, help="score only this many queries (quick look)")
    ap.add_argument("--variant", default="both", choices=["estimated", "oracle", "both"])
    args = ap.parse_args()
    config = PrototypeConfig(num_prototypes=args.prototypes)
    protos = make_prototypes(config, "space")
    from models.prototypes import make_prototype_set

    space = make_prototype_set(config, "space")
    k, m = len(protos), config.views
    # the members' true jitters, as make_views drew them (its first draw)
    rng = views_rng(config)
    true_j = rng.integers(-config.jitter, config.jitter + 1, size=k * m).reshape(k, m)
    xq, cq, yq_lab = make_queries(config, args.queries, seed=0)
    sel = {"test": slice(0, None, 2), "dev": slice(1, None, 2), "all": slice(None)}[args.split]
    xq, cq, yq_lab = xq[sel], cq[sel], yq_lab[sel]
    if args.limit:
        xq, cq, yq_lab = xq[: args.limit], cq[: args.limit], yq_lab[: args.limit]
    model = Model(config)
    yq = model.raw(xq)
    variants = ["estimated", "oracle"] if args.variant == "both" else [args.variant]
    res = {}
    for variant in variants:
        t0 = time.perf_counter()
        scores = np.empty((len(yq), k))
        hits = {"d": 0, "a": 0, "L": 0}
        for c in range(k):
            y = model.raw(space.x[c * m : (c + 1) * m])
            if variant == "oracle":
                d = true_j[c] - true_j[c, 0]
                a = int(protos.translation[c] + true_j[c, 0]) % model.g
                length = int((protos.base[c] != 0).sum())
                _, theta, h = model.fit(y, a, length, d)
                est = (a, length, d, theta, h)
            else:
                est = estimate(model, y)
                dd = est[2] - (true_j[c] - true_j[c, 0])
                hits["d"] += int((dd == dd[0]).all())
                ta = int(protos.translation[c] + true_j[c, 0] - dd[0]) % model.g
                hits["a"] += int(est[0] == ta)
                hits["L"] += int(est[1] == int((protos.base[c] != 0).sum()))
            scores[:, c] = score_queries(model, yq, est, config.jitter)
            if c % 500 == 0:
                print(f"{variant} {c}/{k} {time.perf_counter() - t0:.0f}s", flush=True)
        met = ceiling_metrics(scores, cq, yq_lab, protos.digit)
        log_post = scores - logsumexp(scores, axis=1, keepdims=True)
        met["expected gain ranking"] = ceiling_metrics(expected_gains(log_post, protos.digit), cq, yq_lab, protos.digit)
        met["seconds"] = round(time.perf_counter() - t0, 1)
        if variant == "estimated":
            met["clusters with all relative jitters right"] = hits["d"] / k
            met["block start right"] = hits["a"] / k
            met["block length right"] = hits["L"] / k
        res[variant] = met
        print(variant, json.dumps(met), flush=True)
        np.save(f"/tmp/rr3_members_{variant}_{args.split}.npy", scores)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
