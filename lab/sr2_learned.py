"""A learned head over the weighted generic super-resolution (`lab.generic_sr2`): per cluster (cached) the template
sampled at every fine shift (mean_s) and its variance (var_s); per pair the diagonal Gaussian log-likelihood of the
query per shift plus a learned per-position correction (a small pointwise MLP over r^2 / var, log var and the
mean), log-sum-exp over the shifts the members' range allows, times a learned scale, plus a learned multiple of
the retriever's score. Trained listwise on the retriever's candidate lists of training prototypes; initialised at
the hand-set combination (scale 1, retriever weight 200).

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m lab.sr2_learned --steps 300 --report both
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lab.ceiling import _resample_matrix
from lab.generic_sr2 import fit_cluster
from lab.reranker_study import faiss_order, load_retriever, metrics
from models.biencoder import embed_numpy
from models.prototypes import PrototypeConfig, make_prototype_set, make_queries, make_views

MS = 6


def item_side(x: np.ndarray, views: int, margin: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K*views, D) members -> mean (K, S, D), var (K, S, D), allowed (K, S) bool."""
    rmat = _resample_matrix(72, x.shape[1])
    shifts = np.arange(-MS, MS + 1)
    ops = np.stack([np.roll(rmat, -s, axis=1) for s in shifts])
    lap = np.diff(np.eye(72), 2, axis=0)
    k = len(x) // views
    mean, var, ok = [], [], []
    for c in range(k):
        u, v, d, _ = fit_cluster(x[c * views : (c + 1) * views].astype(np.float64), ops, lap, MS)
        mean.append(ops @ u)
        var.append(ops @ v)
        ok.append((shifts >= d.min() - margin) & (shifts <= d.max() + margin))
    return (
        torch.from_numpy(np.stack(mean)).float(),
        torch.from_numpy(np.stack(var)).float(),
        torch.from_numpy(np.stack(ok)),
    )


class Head(nn.Module):
    def __init__(self, hidden: int = 16, lam: float = 3e-4, retriever_weight: float = 200.0):
        super().__init__()
        self.log_lam = nn.Parameter(torch.tensor(float(np.log(lam))))
        self.mlp = nn.Sequential(
            nn.Conv1d(3, hidden, 1),
            nn.ReLU(),
            nn.Conv1d(hidden, hidden, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(hidden, 1, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.log_scale = nn.Parameter(torch.tensor(0.0))
        self.w_ret = nn.Parameter(torch.tensor(retriever_weight))

    def forward(self, q, mean, var, ok, rscore):
        """q (P, D); mean, var (P, S, D); ok (P, S); rscore (P,) -> keys (P,)."""
        p, s, d = mean.shape
        vv = var + self.log_lam.exp()
        z = (q[:, None, :] - mean).pow(2) / vv
        ll = -0.5 * (z + vv.log())
        feats = torch.stack([z.clamp(max=50.0), vv.log(), mean], 2).reshape(p * s, 3, d)
        corr = self.mlp(feats).reshape(p, s, d)
        lls = (ll + corr).sum(-1).masked_fill(~ok, -1e4)
        return self.log_scale.exp() * torch.logsumexp(lls, -1) + self.w_ret * rscore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train-prototypes", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--top", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--M", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", default="dev", choices=["dev", "test", "both"])
    ap.add_argument("--out", default="/tmp/rr3_results.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ret = load_retriever()
    head = Head()
    res = {"mode": "sr2_learned", "args": vars(args)}
    t0 = time.perf_counter()
    cfg = PrototypeConfig(num_prototypes=args.train_prototypes)
    tr = make_prototype_set(cfg, "train")
    protos = tr.prototypes
    k = len(protos)
    m_tr, v_tr, ok_tr = item_side(tr.x, cfg.views)
    mu_tr = embed_numpy(ret, tr.x).reshape(k, cfg.views, -1).mean(1)
    res["train_item_side_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"train item side {res['train_item_side_seconds']}s", flush=True)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    params = [
        {"params": [p for n, p in head.named_parameters() if n != "w_ret"]},
        {"params": [head.w_ret], "lr": args.lr * 100},
    ]
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[args.lr, args.lr * 100], total_steps=args.steps, pct_start=0.1
    )
    b, g = args.batch, args.group
    t1 = time.perf_counter()
    for step in range(args.steps):
        qid = rng.integers(0, k, size=b)
        xqv = make_views(protos, qid, rng)
        eq = embed_numpy(ret, xqv)
        dist = (eq**2).sum(1)[:, None] - 2 * eq @ mu_tr.T + (mu_tr**2).sum(1)[None]
        own = dist[np.arange(b), qid].copy()
        dist[np.arange(b), qid] = np.inf
        top = np.argpartition(dist, args.top, axis=1)[:, : args.top]
        neg = np.stack([rng.choice(top[i], g - 1, replace=False) for i in range(b)])
        cand = np.concatenate([qid[:, None], neg], 1)
        rs = -np.take_along_axis(dist, cand, 1)
        rs[:, 0] = -own
        flat = torch.from_numpy(cand.reshape(-1))
        keys = head(
            torch.from_numpy(xqv).repeat_interleave(g, 0),
            m_tr[flat],
            v_tr[flat],
            ok_tr[flat],
            torch.from_numpy(rs.reshape(-1).astype(np.float32)),
        ).reshape(b, g)
        loss = F.cross_entropy(keys, torch.zeros(b, dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 0 or (step + 1) % 50 == 0:
            print(
                f"step {step + 1} loss {loss.item():.3f} scale {head.log_scale.exp().item():.3f} "
                f"w_ret {head.w_ret.item():.1f} lam {head.log_lam.exp().item():.5f} {time.perf_counter() - t1:.0f}s",
                flush=True,
            )
    res["train_steps_seconds"] = round(time.perf_counter() - t1, 1)
    head.eval()
    space_cfg = PrototypeConfig(num_prototypes=2300)
    sp = make_prototype_set(space_cfg, "space")
    t2 = time.perf_counter()
    m_sp, v_sp, ok_sp = item_side(sp.x, 10)
    res["space_item_side_seconds"] = round(time.perf_counter() - t2, 1)
    mu = embed_numpy(ret, sp.x).reshape(2300, 10, -1).mean(1)
    labels = sp.prototypes.digit
    xq, cq, yq = make_queries(space_cfg, 500, seed=0)
    for half, s in (("dev", slice(1, None, 2)), ("test", slice(0, None, 2))):
        if args.report not in (half, "both"):
            continue
        order, rscore = faiss_order(embed_numpy(ret, xq[s]), mu)
        rows = {"faiss": [], "rerank": []}
        for i in range(len(order)):
            grades = np.where(np.arange(2300) == cq[s][i], 2, (labels == yq[s][i]).astype(np.int64))
            top = order[i, : args.M]
            with torch.no_grad():
                key = head(
                    torch.from_numpy(xq[s][i : i + 1]),
                    m_sp[top],
                    v_sp[top],
                    ok_sp[top],
                    torch.from_numpy(rscore[i, top].astype(np.float32)),
                ).numpy()
            rows["faiss"].append(metrics(order[i], grades))
            rows["rerank"].append(
                metrics(np.concatenate([top[np.argsort(-key, kind="stable")], order[i, args.M :]]), grades)
            )
        res[half] = {
            n: dict(zip(("r1", "r10", "ndcg10"), np.mean(x, 0).round(3).tolist(), strict=True)) for n, x in rows.items()
        }
    print(json.dumps(res), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
