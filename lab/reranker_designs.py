"""Prototyping rerankers: train candidate pair models with a fixed budget and measure their rerank of the
bi-encoder's FAISS top M on the default space's held-out queries (dev half for tuning, test half reported).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m lab.reranker_designs --design corr --steps 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.biencoder import BiEncoder, cluster_centroids, embed_numpy
from models.biencoder_training import BiEncoderTrainConfig, train_biencoder
from models.pair import correlate
from models.prototypes import PrototypeConfig, make_prototype_set, make_queries, make_views

CACHE = Path("/tmp/rr")
GAINS = np.array([0.0, 1.0, 3.0])


def biencoder(train, val) -> BiEncoder:
    path = CACHE / "biencoder.pt"
    if path.exists():
        m = BiEncoder()
        m.load_state_dict(torch.load(path))
        return m.eval()
    t = time.perf_counter()
    m = train_biencoder(train, val, BiEncoderTrainConfig(seed=0))
    print(f"bi-encoder trained in {time.perf_counter() - t:.1f} s")
    CACHE.mkdir(exist_ok=True)
    torch.save(m.state_dict(), path)
    return m


class Reranker(nn.Module):
    """Item side: a conv trunk (optionally the bi-encoder's own, copied) -> feature maps F (C x L') and an
    embedding g; plus the frozen bi-encoder cosine as a residual. Per pair: interaction -> MLP -> 3 logits."""

    def __init__(self, bi: BiEncoder, design: str, hidden: int = 256, shifts: int = 2, regions: int = 2):
        super().__init__()
        self.design = set(design.split("+"))
        self.bi = bi  # frozen: the retriever's cosine
        for p in self.bi.parameters():
            p.requires_grad_(False)
        net = bi.net
        # trunk copied from the bi-encoder (Unflatten, conv, relu, pool, conv, relu, pool)
        import copy

        self.trunk = (
            copy.deepcopy(net[:7])
            if "init" in self.design
            else nn.Sequential(
                nn.Unflatten(1, (1, 40)),
                nn.Conv1d(1, 32, 5, padding=2),
                nn.ReLU(),
                nn.MaxPool1d(2),
                nn.Conv1d(32, 64, 5, padding=2),
                nn.ReLU(),
                nn.MaxPool1d(2),
            )
        )
        if "shallow" in self.design:
            self.trunk = nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 32, 5, padding=2), nn.ReLU())
        with torch.no_grad():
            fshape = self.trunk(torch.zeros(1, 40)).shape
        self.c, self.length = fshape[1], fshape[2]
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(self.c * self.length, 128), nn.ReLU(), nn.Linear(128, 128))
        if "init" in self.design and "shallow" not in self.design:
            self.embed = nn.Sequential(copy.deepcopy(net[7:]))
        self.shifts, self.regions = shifts, regions
        dim = 0
        if "corr" in self.design:
            dim += self.c * regions * (2 * shifts + 1 + 2)
        if "emb" in self.design:
            dim += 2 * 64 if "init" in self.design and "shallow" not in self.design else 2 * 128
        dim += 1  # the retriever's cosine
        self.norm = nn.BatchNorm1d(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 3)
        )
        self.res = nn.Parameter(torch.tensor([0.0, 0.0, 30.0]))  # logits += res * cosine
        if "early" in self.design:
            self.early = nn.Sequential(
                nn.Conv1d(2, 32, 5, padding=2),
                nn.ReLU(),
                nn.Conv1d(32, 64, 5, padding=2),
                nn.ReLU(),
                nn.MaxPool1d(2),
                nn.Conv1d(64, 64, 5, padding=2),
                nn.ReLU(),
                nn.MaxPool1d(2),
                nn.Flatten(),
            )
            self.norm = nn.BatchNorm1d(640 + 1)
            self.mlp = nn.Sequential(nn.Linear(641, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def item(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        out = {"f": f, "b": self.bi.embed(x), "raw": x}
        if "emb" in self.design:
            out["g"] = F.normalize(self.embed(f), dim=1)
        return out

    def pair(
        self, q: dict[str, torch.Tensor], x: dict[str, torch.Tensor], ccos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q entries broadcast (P or 1 rows); `ccos` (P, 1): the cosine of q to the item's cluster centroid."""
        cos = (q["b"] * x["b"]).sum(1, keepdim=True)
        if "cres" in self.design and ccos is not None:
            cos = ccos
        parts = []
        if "early" in self.design:
            rq = q["raw"].expand(x["raw"].shape[0], -1) if q["raw"].shape[0] != x["raw"].shape[0] else q["raw"]
            parts.append(self.early(torch.stack([rq, x["raw"]], 1)))
        if "corr" in self.design:
            fq, fx = q["f"], x["f"]
            if fq.shape[0] != fx.shape[0]:
                fq = fq.expand(fx.shape[0], -1, -1)
            z = correlate(fq, fx, self.shifts, self.regions).flatten(1)
            eq = fq.pow(2).unflatten(2, (self.regions, -1)).mean(-1).flatten(1)
            ex = fx.pow(2).unflatten(2, (self.regions, -1)).mean(-1).flatten(1)
            parts += [z, eq, ex]
        if "emb" in self.design:
            gq, gx = q["g"], x["g"]
            if gq.shape[0] != gx.shape[0]:
                gq = gq.expand(gx.shape[0], -1)
            parts += [gq * gx, (gq - gx).abs()]
        parts.append(cos)
        z = self.norm(torch.cat(parts, 1))
        return self.mlp(z) + self.res * (cos - 0.85)


def utility_key(logp: torch.Tensor) -> torch.Tensor:
    """The served ranking key for gains (0, 1, 3): log(p1 + 3 p2) - log(3 p0 + 2 p1)."""
    g = torch.tensor(GAINS, dtype=logp.dtype)
    return torch.logsumexp(logp[..., 1:] + g[1:].log(), -1) - torch.logsumexp(logp[..., :2] + (3 - g[:2]).log(), -1)


def train(model: Reranker, train, cents_train, emb_train, steps: int, args) -> float:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    trunk = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(("trunk", "embed"))]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("trunk", "embed"))]
    opt = torch.optim.AdamW(
        [{"params": trunk, "lr": args.lr * args.trunk_lr}, {"params": rest}], lr=args.lr, weight_decay=1e-4
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[args.lr * args.trunk_lr, args.lr], total_steps=steps, pct_start=0.1
    )
    protos = train.prototypes
    k = len(protos)
    views = train.x.reshape(k, -1, 40)
    m = views.shape[1]
    labels = protos.digit
    B, G, n = args.batch, args.group, args.members
    start = time.perf_counter()
    for step in range(steps):
        model.train()
        model.bi.eval()
        qid = rng.integers(0, k, size=B)
        xq = torch.from_numpy(make_views(protos, qid, rng))
        with torch.no_grad():
            bq = model.bi.embed(xq).numpy()
        sims = bq @ cents_train.T
        sims[np.arange(B), qid] = -np.inf
        top = np.argpartition(-sims, args.top, axis=1)[:, : args.top]
        neg = np.stack([rng.choice(top[i], G - 1, replace=False) for i in range(B)])
        cand = np.concatenate([qid[:, None], neg], 1)  # (B, G)
        mem = np.stack([rng.choice(m, n, replace=False) for _ in range(B * G)]).reshape(B, G, n)
        if "fresh" in model.design:
            xs = torch.from_numpy(make_views(protos, np.repeat(cand.reshape(-1), n), rng))
        else:
            xs = torch.from_numpy(views[cand[:, :, None], mem].reshape(-1, 40))
        iq = model.item(xq)
        ix = model.item(xs)
        ccos = torch.from_numpy(np.einsum("bd,bgd->bg", bq, cents_train[cand])).float()
        if "minp" in model.design:
            ix = {key: v.reshape(B * G, n, *v.shape[1:]).mean(1) for key, v in ix.items()}
            rep = torch.arange(B).repeat_interleave(G)
            qrep = {key: v[rep] for key, v in iq.items()}
            logits = model.pair(qrep, ix, ccos.reshape(-1, 1)).reshape(B, G, 3)
        else:
            rep = torch.arange(B).repeat_interleave(G * n)
            qrep = {key: v[rep] for key, v in iq.items()}
            ccos = ccos[:, :, None].expand(B, G, n).reshape(-1, 1)
            logits = model.pair(qrep, ix, ccos).reshape(B, G, n, 3).mean(2)  # mean_logit over members
        logp = torch.log_softmax(logits, -1)
        grade = torch.from_numpy(
            np.where(cand == qid[:, None], 2, (labels[cand] == labels[qid][:, None]).astype(np.int64))
        )
        lce = F.cross_entropy(utility_key(logp), torch.zeros(B, dtype=torch.long))
        pw = F.nll_loss(logp.reshape(-1, 3), grade.reshape(-1))
        loss = lce + args.pointwise * pw
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 0 or (step + 1) % 50 == 0:
            print(
                f"step {step + 1} lce {lce.item():.3f} pw {pw.item():.3f} {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model: Reranker | None, space, cents, xq, cq, yq, M: int) -> dict[str, float]:
    k = len(space.prototypes)
    views = torch.from_numpy(space.x.reshape(k, -1, 40))
    m = views.shape[1]
    labels = space.prototypes.digit
    out = {"faiss": [], "rerank": [], "mean_member_cos": []}
    if model is not None:
        model.eval()
    bq = embed_numpy(model.bi if model else None, xq) if model else None
    for i in range(len(xq)):
        sims = bq[i] @ cents.T
        order = np.argsort(-sims)
        grades = np.where(np.arange(k) == cq[i], 2, (labels == yq[i]).astype(np.int64))
        out["faiss"].append(metrics(order, grades))
        top = order[:M]
        iq = model.item(torch.from_numpy(xq[i : i + 1]))
        ix = model.item(views[top].reshape(-1, 40))
        ccos = torch.from_numpy(cents[top] @ bq[i]).float()[:, None]
        if "minp" in model.design:
            ixm = {key: v.reshape(M, m, *v.shape[1:]).mean(1) for key, v in ix.items()}
            logits = model.pair(iq, ixm, ccos)
        else:
            logits = model.pair(iq, ix, ccos.repeat_interleave(m, 0)).reshape(M, m, 3).mean(1)
        lp = torch.log_softmax(logits.double(), 1)
        u = torch.tensor(GAINS)
        key = torch.logsumexp(lp[:, 1:] + u[1:].log(), 1) - torch.logsumexp(lp[:, :2] + (u.max() - u[:2]).log(), 1)
        rer = np.concatenate([top[np.argsort(-key.numpy(), kind="stable")], order[M:]])
        out["rerank"].append(metrics(rer, grades))
        mc = (iq["b"] * ix["b"]).sum(1).reshape(M, m).mean(1)
        out["mean_member_cos"].append(
            metrics(np.concatenate([top[np.argsort(-mc.numpy(), kind="stable")], order[M:]]), grades)
        )
    return {
        name: dict(zip(("r1", "r10", "ndcg10"), np.mean(v, 0).round(3).tolist(), strict=True))
        for name, v in out.items()
    }


def metrics(order: np.ndarray, grades: np.ndarray) -> tuple[float, float, float]:
    got = grades[order[:10]]
    disc = 1 / np.log2(np.arange(2, 12))
    ideal = (np.sort(GAINS[grades])[::-1][:10] * disc).sum()
    return float(got[0] == 2), float((got == 2).any()), float((GAINS[got] * disc).sum() / ideal)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--design", default="corr+init")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--top", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pointwise", type=float, default=0.3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--shifts", type=int, default=2)
    ap.add_argument("--regions", type=int, default=2)
    ap.add_argument("--M", type=int, default=50)
    ap.add_argument("--report", default="dev", choices=["dev", "test", "both"])
    ap.add_argument("--out", default="")
    ap.add_argument("--mode", default="pair", choices=["pair", "embedding", "pairnet"])
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--mix", type=float, default=0.0)
    ap.add_argument("--trunk-lr", type=float, default=1.0)
    args = ap.parse_args()
    if args.mode == "embedding":
        return run_embedding(args)
    if args.mode == "pairnet":
        return run_pairnet(args)
    torch.set_num_threads(1)
    train_set = make_prototype_set(PrototypeConfig(num_prototypes=4000), "train")
    val_set = make_prototype_set(PrototypeConfig(num_prototypes=800), "val")
    space_cfg = PrototypeConfig(num_prototypes=2300)
    space = make_prototype_set(space_cfg, "space")
    xq, cq, yq = make_queries(space_cfg, 500, seed=0)
    bi = biencoder(train_set, val_set)
    emb_train = embed_numpy(bi, train_set.x)
    cents_train = cluster_centroids(emb_train, train_set.cluster)
    cents = cluster_centroids(embed_numpy(bi, space.x), space.cluster)
    model = Reranker(bi, args.design, args.hidden, args.shifts, args.regions)
    secs = train(model, train_set, cents_train, emb_train, args.steps, args)
    res = {"args": vars(args), "train_seconds": round(secs, 1)}
    halves = {"dev": slice(1, None, 2), "test": slice(0, None, 2)}  # cascade.queries.SPLIT_RULE
    for name in ["dev", "test"] if args.report == "both" else [args.report]:
        s = halves[name]
        res[name] = evaluate(model, space, cents, xq[s], cq[s], yq[s], args.M)
    print(json.dumps(res))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


def hard_batches(cents_train: np.ndarray, anchors: int, neighbours: int, rng: np.random.Generator) -> np.ndarray:
    """`anchors` random prototypes and each one's `neighbours - 1` nearest by the retriever: a batch in which
    every prototype has its look-alikes as in-batch negatives."""
    k = len(cents_train)
    a = rng.choice(k, anchors, replace=False)
    sims = cents_train[a] @ cents_train.T
    near = np.argsort(-sims, axis=1)[:, : neighbours * 2]
    out = []
    for row in near:
        out.extend(rng.choice(row, neighbours, replace=False).tolist())
    ids = np.unique(np.asarray(out))
    return ids


def run_embedding(args) -> None:
    """Fine-tune an embedding (copy of the retriever, or wider) with InfoNCE of query views against member
    centroids on neighbourhood batches; rerank FAISS top M by the new centroid cosine."""
    import copy

    torch.set_num_threads(1)
    train_set = make_prototype_set(PrototypeConfig(num_prototypes=4000), "train")
    val_set = make_prototype_set(PrototypeConfig(num_prototypes=800), "val")
    space_cfg = PrototypeConfig(num_prototypes=2300)
    space = make_prototype_set(space_cfg, "space")
    xq, cq, yq = make_queries(space_cfg, 500, seed=0)
    bi = biencoder(train_set, val_set)
    cents_train = cluster_centroids(embed_numpy(bi, train_set.x), train_set.cluster)
    cents = cluster_centroids(embed_numpy(bi, space.x), space.cluster)
    if args.design == "copy":
        model = copy.deepcopy(bi).train()
    else:
        from models.biencoder import BiEncoderSpec

        model = BiEncoder(BiEncoderSpec(channels=(64, 128), hidden=256, embed_dim=128))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    protos = train_set.prototypes
    k = len(protos)
    views = train_set.x.reshape(k, -1, 40)
    start = time.perf_counter()
    for step in range(args.steps):
        model.train()
        ids = hard_batches(cents_train, args.batch, args.group, rng)
        xqv = torch.from_numpy(make_views(protos, ids, rng))
        mem = np.stack([rng.choice(views.shape[1], args.members, replace=False) for _ in ids])
        xs = torch.from_numpy(views[ids[:, None], mem].reshape(-1, 40))
        eq = model.embed(xqv)
        ex = model.embed(xs).reshape(len(ids), args.members, -1).mean(1)
        ex = F.normalize(ex, dim=1)
        logits = eq @ ex.T / args.temperature
        loss = F.cross_entropy(logits, torch.arange(len(ids)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 0 or (step + 1) % 50 == 0:
            print(f"step {step + 1} n={len(ids)} loss {loss.item():.3f} {time.perf_counter() - start:.0f}s", flush=True)
    secs = time.perf_counter() - start
    model.eval()
    res = {"args": vars(args), "train_seconds": round(secs, 1)}
    new_c = cluster_centroids(embed_numpy(model, space.x), space.cluster)
    for name, s in (("dev", slice(1, None, 2)), ("test", slice(0, None, 2))):
        bq, nq = embed_numpy(bi, xq[s]), embed_numpy(model, xq[s])
        rows = {"faiss": [], "rerank": [], "new_alone": []}
        for i in range(len(bq)):
            grades = np.where(
                np.arange(len(cents)) == cq[s][i], 2, (space.prototypes.digit == yq[s][i]).astype(np.int64)
            )
            order = np.argsort(-(bq[i] @ cents.T))
            rows["faiss"].append(metrics(order, grades))
            top = order[: args.M]
            key = nq[i] @ new_c[top].T + args.mix * (bq[i] @ cents[top].T)
            rows["rerank"].append(
                metrics(np.concatenate([top[np.argsort(-key, kind="stable")], order[args.M :]]), grades)
            )
            rows["new_alone"].append(metrics(np.argsort(-(nq[i] @ new_c.T)), grades))
        res[name] = {
            n: dict(zip(("r1", "r10", "ndcg10"), np.mean(v, 0).round(3).tolist(), strict=True)) for n, v in rows.items()
        }
    print(json.dumps(res))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


def run_pairnet(args) -> None:
    """The integrated model (`models.pair.PairNetwork` with a retriever, `train_pair_listwise`), served as the
    engine serves it (cached item inputs with each cluster's centroid, `prepare` + `score_prepared`)."""
    from dataclasses import replace

    from models.pair import PairNetwork, default_pair_spec
    from models.pair_training import ListwiseConfig, train_pair_listwise

    torch.set_num_threads(1)
    train_set = make_prototype_set(PrototypeConfig(num_prototypes=4000), "train")
    val_set = make_prototype_set(PrototypeConfig(num_prototypes=800), "val")
    space_cfg = PrototypeConfig(num_prototypes=2300)
    space = make_prototype_set(space_cfg, "space")
    xq, cq, yq = make_queries(space_cfg, 500, seed=0)
    bi = biencoder(train_set, val_set)
    spec = replace(default_pair_spec(hidden=(args.hidden, args.hidden)), retriever=bi.spec)
    model = PairNetwork(spec)
    model.retriever.load_state_dict(bi.state_dict())
    cfg = ListwiseConfig(
        steps=args.steps,
        queries=args.batch,
        group=args.group,
        members=args.members,
        top=args.top,
        lr=args.lr,
        pointwise=args.pointwise,
    )
    model, report = train_pair_listwise(model, train_set, val_set, cfg)
    print(report, flush=True)
    evaluate_pairnet(model, bi, space, xq, cq, yq, args)


@torch.no_grad()
def evaluate_pairnet(model, bi, space, xq, cq, yq, args, name="pairnet"):
    from models.pair_training import default_grade_gains, ranking_key

    k = len(space.prototypes)
    offsets = np.searchsorted(space.cluster, np.arange(k + 1))
    feats = torch.from_numpy(space.x)
    table = model.item_inputs(feats, model.cluster_context(feats, offsets))
    emb = embed_numpy(bi, space.x)
    mu = np.add.reduceat(emb.astype(np.float64), offsets[:-1], axis=0) / np.diff(offsets)[:, None]
    labels = space.prototypes.digit
    res = {"args": vars(args)}
    for half, s in (("dev", slice(1, None, 2)), ("test", slice(0, None, 2))):  # cascade.queries.SPLIT_RULE
        rows = {"faiss": [], "rerank": []}
        eqs = embed_numpy(bi, xq[s])
        for i, (q, c, y) in enumerate(zip(xq[s], cq[s], yq[s], strict=True)):
            d = ((eqs[i][None, :] - mu) ** 2).sum(1)
            order = np.argsort(d, kind="stable")
            grades = np.where(np.arange(k) == c, 2, (labels == y).astype(np.int64))
            rows["faiss"].append(metrics(order, grades))
            top = order[: args.M]
            member_rows = np.concatenate([np.arange(offsets[t], offsets[t + 1]) for t in top])
            logits, _ = model.score_prepared(
                model.prepare(torch.from_numpy(q[None]), len(member_rows)), table[member_rows]
            )
            counts = np.diff(offsets)[top]
            seg = torch.from_numpy(np.repeat(np.arange(len(top)), counts))
            mean = torch.zeros(len(top), logits.shape[1], dtype=torch.float64).index_add_(0, seg, logits.double())
            mean /= torch.from_numpy(counts)[:, None]
            key = ranking_key(torch.log_softmax(mean, 1), default_grade_gains(3).double()).numpy()
            rows["rerank"].append(
                metrics(np.concatenate([top[np.argsort(-key, kind="stable")], order[args.M :]]), grades)
            )
        res[half] = {
            n: dict(zip(("r1", "r10", "ndcg10"), np.mean(v, 0).round(3).tolist(), strict=True)) for n, v in rows.items()
        }
    print(json.dumps(res), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"name": name, **res}) + "\n")


if __name__ == "__main__":
    main()
