"""A learned reranker over super-resolved clusters (`lab.superres`): the item side is each cluster's template u and
spread v on a grid `factor` times finer (shift-and-add of its members at their estimated sub-sample shifts), and
the members' shift range; per pair, the query minus the template sampled at every fine shift is filtered by a
learned filter bank, squared, weighted per filter and position by a small conv net over (u, log v), summed with a
learned per-position offset; log-sum-exp over the shifts the members' range allows; plus the retriever's score
as a residual. Initialised as the diagonal Gaussian (filter 0 a delta, weight 1 / (v + lam)); trained listwise on
the retriever's own candidate lists of training prototypes.

    PYTHONPATH=. OMP_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1 python -m lab.sr_reranker --steps 300 --report both
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lab.reranker_study import faiss_order, load_retriever, metrics
from lab.superres import super_resolve
from models.biencoder import embed_numpy
from models.prototypes import PrototypeConfig, make_prototype_set, make_queries, make_views


class SRScorer(nn.Module):
    def __init__(
        self,
        factor: int,
        max_shift: int,
        filters: int = 8,
        width: int = 7,
        hidden: int = 16,
        margin: int = 4,
        lam: float = 0.02,
        learned: bool = True,
    ):
        super().__init__()
        self.factor, self.max_shift, self.margin, self.learned = factor, max_shift, margin, learned
        self.nf = filters
        w = 0.3 * torch.randn(filters, 1, width)
        w[0] = 0
        w[0, 0, width // 2] = 1.0
        self.filters = nn.Parameter(w)
        self.log_lam = nn.Parameter(torch.tensor(float(np.log(lam))))
        self.net = nn.Sequential(
            nn.Conv1d(3, hidden, 9, padding=4, padding_mode="circular"),
            nn.ReLU(),
            nn.Conv1d(hidden, hidden, 9, padding=4, padding_mode="circular"),
            nn.ReLU(),
            nn.Conv1d(hidden, filters + 1, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.base = nn.Parameter(torch.tensor([0.0] + [-4.0] * (filters - 1)))
        self.log_temp = nn.Parameter(torch.tensor(0.0))
        self.res = nn.Parameter(torch.tensor(0.0))

    def cluster_side(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(K, Lf) x2 -> (K, F + 1, Lf): log-weights per filter and the per-position offset."""
        lv = torch.log(v + self.log_lam.exp())
        logw = -lv[:, None] + self.base[None, :, None]
        off = -0.5 * lv[:, None]
        out = torch.cat([logw, off], 1)
        if self.learned:
            du = (u - torch.roll(u, 1, -1)) * self.factor
            out = out + self.net(torch.stack([u, lv, du], 1))
        return out

    def forward(self, q: torch.Tensor, u: torch.Tensor, side: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """q (P, D) or (1, D); u (P, Lf); side (P, F+1, Lf); d (P, n) -> (P,) scores."""
        p, dd = u.shape[0], q.shape[1]
        lf = u.shape[1]
        shifts = torch.arange(-self.max_shift, self.max_shift + 1)
        pos = (torch.arange(dd)[None, :] * self.factor - shifts[:, None]) % lf  # (S, D)
        pred = u[:, pos]  # (P, S, D)
        r = (q[:, None, :] - pred).reshape(-1, 1, dd)
        z = F.conv1d(r, self.filters, padding=self.filters.shape[-1] // 2).reshape(p, len(shifts), self.nf, dd)
        sw = side[:, :, pos]  # (P, F+1, S, D)
        ll = -0.5 * (sw[:, : self.nf].permute(0, 2, 1, 3).exp() * z.pow(2)).sum((2, 3)) + sw[:, self.nf].sum(-1)
        lo, hi = d.min(1).values - self.margin, d.max(1).values + self.margin
        ok = (shifts[None] >= lo[:, None]) & (shifts[None] <= hi[:, None])
        ll = ll.masked_fill(~ok, -1e4)
        temp = self.log_temp.exp()
        return torch.logsumexp(temp * ll, -1) / temp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--max-shift", type=int, default=16)
    ap.add_argument("--M", type=int, default=50)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--top", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--filters", type=int, default=8)
    ap.add_argument("--train-prototypes", type=int, default=4000)
    ap.add_argument("--no-learn", action="store_true")
    ap.add_argument("--report", default="dev", choices=["dev", "test", "both"])
    ap.add_argument("--out", default="/tmp/rr3_results.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    retriever = load_retriever()
    model = SRScorer(args.factor, args.max_shift, args.filters, learned=not args.no_learn)
    res = {"mode": "superres", "args": vars(args)}
    if not args.no_learn:
        res.update(train(model, retriever, args))
    model.eval()
    space_cfg = PrototypeConfig(num_prototypes=2300)
    space = make_prototype_set(space_cfg, "space")
    xq, cq, yq = make_queries(space_cfg, 500, seed=0)
    k = len(space.prototypes)
    labels = space.prototypes.digit
    emb = embed_numpy(retriever, space.x)
    mu = emb.reshape(k, -1, emb.shape[1]).mean(1)
    t0 = time.perf_counter()
    u, v, d = super_resolve(torch.from_numpy(space.x.reshape(k, space_cfg.views, -1)), args.factor, args.max_shift)
    res["space_item_side_seconds"] = round(time.perf_counter() - t0, 1)
    with torch.no_grad():
        side = model.cluster_side(u, v)
    for half, s in (("dev", slice(1, None, 2)), ("test", slice(0, None, 2))):
        if args.report not in (half, "both"):
            continue
        eq = embed_numpy(retriever, xq[s])
        order, rscore = faiss_order(eq, mu)
        rows = {"faiss": [], "rerank": [], "alone_topM": []}
        for i in range(len(eq)):
            grades = np.where(np.arange(k) == cq[s][i], 2, (labels == yq[s][i]).astype(np.int64))
            rows["faiss"].append(metrics(order[i], grades))
            top = order[i, : args.M]
            with torch.no_grad():
                sc = model(torch.from_numpy(xq[s][i : i + 1]), u[top], side[top], d[top]).numpy()
            key = sc + model.res.item() * rscore[i, top]
            rest = order[i, args.M :]
            rows["rerank"].append(metrics(np.concatenate([top[np.argsort(-key, kind="stable")], rest]), grades))
            rows["alone_topM"].append(metrics(np.concatenate([top[np.argsort(-sc, kind="stable")], rest]), grades))
        res[half] = {
            n: dict(zip(("r1", "r10", "ndcg10"), np.mean(x, 0).round(3).tolist(), strict=True)) for n, x in rows.items()
        }
    print(json.dumps(res), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")


def train(model: SRScorer, retriever, args) -> dict:
    start = time.perf_counter()
    cfg = PrototypeConfig(num_prototypes=args.train_prototypes)
    train_set = make_prototype_set(cfg, "train")
    protos = train_set.prototypes
    k = len(protos)
    u, v, d = super_resolve(torch.from_numpy(train_set.x.reshape(k, cfg.views, -1)), args.factor, args.max_shift)
    emb = embed_numpy(retriever, train_set.x)
    mu = emb.reshape(k, -1, emb.shape[1]).mean(1)
    prep = time.perf_counter() - start
    print(f"prep {prep:.1f}s", flush=True)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    b, g = args.batch, args.group
    for step in range(args.steps):
        model.train()
        qid = rng.integers(0, k, size=b)
        xqv = make_views(protos, qid, rng)
        eq = embed_numpy(retriever, xqv)
        dist = (eq**2).sum(1)[:, None] - 2 * eq @ mu.T + (mu**2).sum(1)[None]
        own = dist[np.arange(b), qid].copy()
        dist[np.arange(b), qid] = np.inf
        top = np.argpartition(dist, args.top, axis=1)[:, : args.top]
        neg = np.stack([rng.choice(top[i], g - 1, replace=False) for i in range(b)])
        cand = np.concatenate([qid[:, None], neg], 1)
        rs = -np.take_along_axis(dist, cand, 1)
        rs[:, 0] = -own
        flat = torch.from_numpy(cand.reshape(-1))
        side = model.cluster_side(u[flat], v[flat])
        sc = model(torch.from_numpy(xqv).repeat_interleave(g, 0), u[flat], side, d[flat]).reshape(b, g)
        key = sc + model.res * torch.from_numpy(rs.astype(np.float32))
        loss = F.cross_entropy(key, torch.zeros(b, dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 0 or (step + 1) % 50 == 0:
            print(
                f"step {step + 1} loss {loss.item():.3f} temp {model.log_temp.exp().item():.3f} "
                f"res {model.res.item():.2f} {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    return {"prep_seconds": round(prep, 1), "train_seconds": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    main()
