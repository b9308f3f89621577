"""Reranker study: rerank the bi-encoder's FAISS top M of the default space by reading a cluster's members
together, aligned below one sample.

Item side (query independent, once per cluster): members upsampled x U (linear), aligned to each other over
fine shifts (cross-correlation with one member, then rounds of re-alignment to the aligned mean), their mean T
and spread V per position. Per pair: the query, upsampled, against T over fine shifts: a weighted squared distance
per shift, soft-min over shifts, plus a per-cluster offset. `gauss`: weights 1 / (V + lam), offset -1/2 sum log(V +
lam) (a diagonal Gaussian, not learned). `learned`: a small conv net maps (T, log V) to per-position log-weights
and offsets, trained listwise (softmax over the own cluster and the retriever's top candidates) with the
retriever's score as a residual.

    PYTHONPATH=. OMP_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1 python -m lab.reranker_study gauss
    PYTHONPATH=. OMP_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1 python -m lab.reranker_study learned --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.biencoder import BiEncoder, embed_numpy
from models.prototypes import PrototypeConfig, make_prototype_set, make_queries, make_views

GAINS = np.array([0.0, 1.0, 3.0])
HOME = Path(os.environ.get("PRUNECASCADE_HOME", "var"))  # a bootstrapped home: its retriever is the one studied


def metrics(order: np.ndarray, grades: np.ndarray) -> tuple[float, float, float]:
    got = grades[order[:10]]
    disc = 1 / np.log2(np.arange(2, 12))
    ideal = (np.sort(GAINS[grades])[::-1][:10] * disc).sum()
    return float(got[0] == 2), float((got == 2).any()), float((GAINS[got] * disc).sum() / ideal)


def load_retriever() -> BiEncoder:
    from models.registry import ModelRegistry

    model = ModelRegistry(HOME / "registry").load("pair-dense").model
    return model.retriever.eval()


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(..., D) -> (..., (D-1) * factor + 1): linear interpolation, the original samples kept."""
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    out = F.interpolate(flat, size=(shape[-1] - 1) * factor + 1, mode="linear", align_corners=True)
    return out.reshape(*shape[:-1], -1)


def rolled(x: torch.Tensor, shifts: range) -> torch.Tensor:
    """(..., L) -> (..., S, L): x rolled left by every s (x[p + s] at position p)."""
    return torch.stack([torch.roll(x, -s, dims=-1) for s in shifts], dim=-2)


@torch.no_grad()
def align_members(members: torch.Tensor, factor: int, max_shift: int, rounds: int = 3) -> torch.Tensor:
    """(K, n, D) -> (K, n, Lu) members upsampled and aligned to each other (template refinement)."""
    up = upsample(members.double(), factor)
    up_c = up - up.mean(-1, keepdim=True)
    shifts = range(-max_shift, max_shift + 1)
    cand = rolled(up_c, shifts)  # (K, n, S, Lu)
    ref = up_c[:, :1]  # member 0
    for r in range(rounds + 1):
        score = (cand * ref[:, :, None, :]).sum(-1)  # (K, n, S)
        idx = score.argmax(-1)  # (K, n)
        if r < rounds:
            # centre: the median shift becomes 0
            med = idx.median(dim=1, keepdim=True).values
            idx = (idx - med + max_shift).clamp(0, 2 * max_shift)
            aligned = torch.gather(cand, 2, idx[:, :, None, None].expand(-1, -1, 1, cand.shape[-1]))[:, :, 0]
            ref = aligned.mean(1, keepdim=True)
    med = idx.median(dim=1, keepdim=True).values
    idx = (idx - med + max_shift).clamp(0, 2 * max_shift)
    full = rolled(up, shifts)
    return torch.gather(full, 2, idx[:, :, None, None].expand(-1, -1, 1, full.shape[-1]))[:, :, 0]


def cluster_stats(x: np.ndarray, views: int, factor: int, max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    members = torch.from_numpy(x.reshape(-1, views, x.shape[1]))
    out_t, out_v = [], []
    for i in range(0, len(members), 256):
        a = align_members(members[i : i + 256], factor, max_shift)
        out_t.append(a.mean(1))
        out_v.append(a.var(1))
    return torch.cat(out_t).float(), torch.cat(out_v).float()


def shifted_distances(q: torch.Tensor, t: torch.Tensor, w: torch.Tensor, shifts: range) -> torch.Tensor:
    """q (P, Lu) or (1, Lu); t, w (P, Lu) -> (P, S): sum_p w_p (q[p + s] - t_p)^2."""
    qs = rolled(q, shifts)  # (P|1, S, Lu)
    return (qs.pow(2) * w[:, None]).sum(-1) - 2 * (qs * (w * t)[:, None]).sum(-1) + (w * t.pow(2)).sum(-1, keepdim=True)


class Scorer(nn.Module):
    """Per cluster (T, V) -> per-position log-weights and offsets; per pair soft-min over shifts."""

    def __init__(self, factor: int, query_shift: int, hidden: int = 16, kernel: int = 9, learned: bool = True):
        super().__init__()
        self.factor, self.query_shift, self.learned = factor, query_shift, learned
        self.lam = nn.Parameter(torch.tensor(np.log(0.05), dtype=torch.float32))
        self.net = nn.Sequential(
            nn.Conv1d(3, hidden, kernel, padding=kernel // 2),
            nn.ReLU(),
            nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2),
            nn.ReLU(),
            nn.Conv1d(hidden, 2, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.log_temp = nn.Parameter(torch.tensor(np.log(1.0 / factor), dtype=torch.float32))
        self.res = nn.Parameter(torch.tensor(0.0))

    def cluster_side(self, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, Lu) x2 -> log-weight (K, Lu) and offset (K,): a diagonal Gaussian, corrected by the net."""
        lv = torch.log(v + self.lam.exp())
        logw, off = -lv, -0.5 * lv.sum(-1)
        if self.learned:
            z = self.net(torch.stack([t, lv, (t - torch.roll(t, 1, -1)) * self.factor], 1))
            logw = logw + z[:, 0]
            off = off + z[:, 1].sum(-1)
        return logw, off

    def forward(self, q: torch.Tensor, t: torch.Tensor, logw: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        d = shifted_distances(q, t, logw.exp(), range(-self.query_shift, self.query_shift + 1))
        temp = self.log_temp.exp()
        return torch.logsumexp(-0.5 * temp * d, -1) + temp * off


def faiss_order(eq: np.ndarray, mu: np.ndarray) -> np.ndarray:
    d = (eq**2).sum(1)[:, None] - 2 * eq @ mu.T + (mu**2).sum(1)[None]
    return np.argsort(d, axis=1, kind="stable"), -d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["faiss", "gauss", "learned"])
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--align-shift", type=int, default=12)
    ap.add_argument("--query-shift", type=int, default=14)
    ap.add_argument("--M", type=int, default=50)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--top", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--residual", type=float, default=1.0, help="weight of the retriever score in the key")
    ap.add_argument("--report", default="dev", choices=["dev", "test", "both"])
    ap.add_argument("--out", default="/tmp/rr3_results.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    retriever = load_retriever()
    space_cfg = PrototypeConfig(num_prototypes=2300)
    space = make_prototype_set(space_cfg, "space")
    xq, cq, yq = make_queries(space_cfg, 500, seed=0)
    k = len(space.prototypes)
    labels = space.prototypes.digit
    emb = embed_numpy(retriever, space.x)
    mu = emb.reshape(k, -1, emb.shape[1]).mean(1)
    t0 = time.perf_counter()
    t_sp, v_sp = cluster_stats(space.x, space_cfg.views, args.factor, args.align_shift)
    stats_seconds = time.perf_counter() - t0
    scorer = Scorer(args.factor, args.query_shift, learned=args.mode == "learned")
    res = {"mode": args.mode, "args": vars(args), "space_stats_seconds": round(stats_seconds, 1)}
    if args.mode == "learned":
        res["train_seconds"] = train(scorer, retriever, args)
    scorer.eval()
    halves = {"dev": slice(1, None, 2), "test": slice(0, None, 2)}
    with torch.no_grad():
        logw, off = scorer.cluster_side(t_sp, v_sp)
    for half in ["dev", "test"] if args.report == "both" else [args.report]:
        s = halves[half]
        eq = embed_numpy(retriever, xq[s])
        order, rscore = faiss_order(eq, mu)
        qu = upsample(torch.from_numpy(xq[s]), args.factor)
        rows = {"faiss": [], "rerank": [], "alone_topM": []}
        for i in range(len(eq)):
            grades = np.where(np.arange(k) == cq[s][i], 2, (labels == yq[s][i]).astype(np.int64))
            rows["faiss"].append(metrics(order[i], grades))
            top = order[i, : args.M]
            with torch.no_grad():
                sc = scorer(qu[i : i + 1], t_sp[top], logw[top], off[top]).numpy()
            key = sc + args.residual * scorer.res.item() * rscore[i, top] if args.mode == "learned" else sc
            rows["rerank"].append(
                metrics(np.concatenate([top[np.argsort(-key, kind="stable")], order[i, args.M :]]), grades)
            )
            rows["alone_topM"].append(
                metrics(np.concatenate([top[np.argsort(-sc, kind="stable")], order[i, args.M :]]), grades)
            )
        res[half] = {
            n: dict(zip(("r1", "r10", "ndcg10"), np.mean(v, 0).round(3).tolist(), strict=True)) for n, v in rows.items()
        }
    print(json.dumps(res), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")


def train(scorer: Scorer, retriever: BiEncoder, args) -> float:
    """Listwise: per query (a fresh view of a training prototype), its own cluster and group - 1 of the retriever's
    top `top` other clusters; softmax cross-entropy of the key with the own cluster as the target."""
    start = time.perf_counter()
    train_cfg = PrototypeConfig(num_prototypes=4000)
    train_set = make_prototype_set(train_cfg, "train")
    protos = train_set.prototypes
    k = len(protos)
    t_tr, v_tr = cluster_stats(train_set.x, train_cfg.views, args.factor, args.align_shift)
    emb = embed_numpy(retriever, train_set.x)
    mu = emb.reshape(k, -1, emb.shape[1]).mean(1)
    prep = time.perf_counter() - start
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(scorer.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    b, g = args.batch, args.group
    for step in range(args.steps):
        scorer.train()
        qid = rng.integers(0, k, size=b)
        xqv = make_views(protos, qid, rng)
        eq = embed_numpy(retriever, xqv)
        d = (eq**2).sum(1)[:, None] - 2 * eq @ mu.T + (mu**2).sum(1)[None]
        d[np.arange(b), qid] = np.inf
        top = np.argpartition(d, args.top, axis=1)[:, : args.top]
        neg = np.stack([rng.choice(top[i], g - 1, replace=False) for i in range(b)])
        cand = np.concatenate([qid[:, None], neg], 1)  # (b, g)
        rs = torch.from_numpy(-np.take_along_axis(d, cand, 1).astype(np.float32))
        rs[:, 0] = torch.from_numpy(-((eq - mu[qid]) ** 2).sum(1).astype(np.float32))
        flat = torch.from_numpy(cand.reshape(-1))
        logw, off = scorer.cluster_side(t_tr[flat], v_tr[flat])
        qu = upsample(torch.from_numpy(xqv), args.factor).repeat_interleave(g, 0)
        sc = scorer(qu, t_tr[flat], logw, off).reshape(b, g)
        key = sc + args.residual * scorer.res * rs
        loss = F.cross_entropy(key, torch.zeros(b, dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 0 or (step + 1) % 50 == 0:
            print(
                f"step {step + 1} loss {loss.item():.3f} temp {scorer.log_temp.exp().item():.3f} "
                f"res {scorer.res.item():.2f} {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    secs = time.perf_counter() - start
    print(f"train: prep {prep:.1f}s total {secs:.1f}s", flush=True)
    return round(secs, 1)


if __name__ == "__main__":
    main()
