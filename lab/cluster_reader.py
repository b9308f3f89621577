"""A cluster reader: a learned pair model that reads all of a cluster's members together, trained listwise on the
retriever's own candidate lists, with the retriever's score as a residual (it starts exactly at FAISS's ranking).

The model (`models.cluster_reader`: features from the bi-encoder's first convs, a reader of every member aligned
to the query, the retriever's score as a residual) is described there; this script trains and measures it.

Training (localized contrastive estimation): a query is a fresh view of a training prototype (on a user's clusters
it would be a held-out member), its group = its own cluster + `group - 1` clusters drawn from the retriever's top
`top` for it; softmax cross-entropy of the key with the own cluster as target. Nothing here knows the generator's
grid or noise model. Measured: rerank of FAISS top M of the default space, shipped queries (dev = odd positions,
test = even), weights of the last step (no selection).

    PYTHONPATH=. OMP_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1 PRUNECASCADE_HOME=/work/homes/h3 \\
        nice -n 5 python -m lab.cluster_reader --feature c1 --steps 600 --out /work/scratch-reader/c1.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace

import numpy as np
import torch

from cascade.bootstrap import prototype_training_sets
from cascade.bootstrap_config import PairConfig
from lab.exact_teacher import ExactTeacher, soft_cross_entropy
from lab.reranker_study import faiss_order, load_retriever, metrics
from models.biencoder import BiEncoder, embed_numpy
from models.cluster_reader import FEATURES, MODES, ClusterReader, MemberFeatures, ReaderRanker, listwise_loss
from models.cluster_reader_training import Groups, fit_alpha, group_top1
from models.prototypes import PrototypeConfig, make_prototype_set, make_queries


def sample_members(xs: torch.Tensor, clusters: np.ndarray, n: int | None, rng: np.random.Generator) -> torch.Tensor:
    """The members of `clusters` (B, G) as (B, G, n, D): all of them when n is None, else n of each drawn without
    replacement (as a cascade stage samples them)."""
    members = xs[torch.from_numpy(clusters)]
    if n is None or n >= members.shape[2]:
        return members
    pick = np.argsort(rng.random(members.shape[:3]), axis=2)[..., :n]
    return torch.take_along_dim(members, torch.from_numpy(pick)[..., None], dim=2)


@torch.no_grad()
def rerank(
    model: ReaderRanker,
    retriever: BiEncoder,
    space,
    xq,
    cq,
    yq,
    m: int,
    chunk: int = 10,
    members: int | None = None,
    first: tuple[int, int] | None = None,
    seed: int = 0,
    alpha_scales: tuple[float, ...] = (),
):
    """FAISS's ranking, the reader's rerank of its top `m` and the reader alone's, per query. `members`: the reader
    reads that many sampled members of each cluster. `first` = (n, keep): a two-stage cascade, the reader on n
    sampled members of the top `m` keeps its best `keep`, which it then reads whole (the alone column is then the
    first stage's ranking). `alpha_scales`: also the rerank with the residual's weight times each scale (rows per
    scale, the fourth value returned), to choose the weight on dev queries. Last: the reader's milliseconds per
    query (its calls alone)."""
    model.eval()
    rng = np.random.default_rng([seed, 3])
    k = len(space.prototypes)
    views = space.prototypes.config.views
    emb = embed_numpy(retriever, space.x)
    mu = emb.reshape(k, views, -1).mean(1)
    order, rscore = faiss_order(embed_numpy(retriever, xq), mu)
    labels = space.prototypes.digit
    xs = torch.from_numpy(space.x.reshape(k, views, -1))
    faiss_rows, rows, alone_rows = [], [], []
    scaled_rows: dict[float, list] = {a: [] for a in alpha_scales}
    alpha = model.reader.log_alpha.exp().item()
    model_seconds = 0.0  # the reader's calls alone (features, item side, reader), per `chunk` queries at a time
    for i0 in range(0, len(xq), chunk):
        idx = np.arange(i0, min(i0 + chunk, len(xq)))
        top = order[idx, :m]
        q = torch.from_numpy(xq[idx])
        rs = np.take_along_axis(rscore[idx], top, 1).astype(np.float32)
        started = time.perf_counter()
        if first is None:
            keys = model.scores(q, sample_members(xs, top, members, rng), torch.from_numpy(rs)).numpy()
            alone = keys - alpha * rs
        else:
            n1, keep = first
            alone = model.scores(q, sample_members(xs, top, n1, rng), torch.from_numpy(rs)).numpy()
            kept = np.argsort(-alone, axis=1, kind="stable")[:, :keep]
            second = model.scores(
                q,
                sample_members(xs, np.take_along_axis(top, kept, 1), None, rng),
                torch.from_numpy(np.take_along_axis(rs, kept, 1)),
            ).numpy()
            keys = np.full_like(alone, -np.inf)  # the dropped keep the first stage's order, below the kept
            np.put_along_axis(keys, kept, second, 1)
            dropped = np.isinf(keys)
            keys[dropped] = alone[dropped] - 1e9
        model_seconds += time.perf_counter() - started
        for j, i in enumerate(idx):
            grades = np.where(np.arange(k) == cq[i], 2, (labels == yq[i]).astype(np.int64))
            faiss_rows.append(metrics(order[i], grades))
            new = np.concatenate([top[j][np.argsort(-keys[j], kind="stable")], order[i, m:]])
            rows.append(metrics(new, grades))
            new = np.concatenate([top[j][np.argsort(-alone[j], kind="stable")], order[i, m:]])
            alone_rows.append(metrics(new, grades))
            for a, out in scaled_rows.items():
                key = alone[j] + a * alpha * rs[j]
                out.append(metrics(np.concatenate([top[j][np.argsort(-key, kind="stable")], order[i, m:]]), grades))
    return faiss_rows, rows, alone_rows, scaled_rows, 1000.0 * model_seconds / max(len(xq), 1)


def r1_gain(rows, faiss_rows) -> dict:
    """Recall@1 over FAISS alone, per query paired: the mean difference and its standard error."""
    diff = np.array(rows)[:, 0] - np.array(faiss_rows)[:, 0]
    return {
        "r1_diff": round(float(diff.mean()), 4),
        "r1_diff_se": round(float(diff.std(ddof=1) / math.sqrt(len(diff))), 4),
    }


def summary(rows) -> dict:
    return dict(zip(("r1", "r10", "ndcg10"), np.mean(rows, 0).round(4).tolist(), strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="xattn", choices=MODES)
    ap.add_argument("--feature", default="c1", choices=FEATURES)
    ap.add_argument("--trainable", action="store_true", help="train the trunk too (initialised from the bi-encoder)")
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--dv", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--max-shift", type=int, default=12, help="relative positions beyond this are masked")
    ap.add_argument("--context", type=int, default=0, help="odd kernel of a conv over the residual's positions")
    ap.add_argument("--nearest", action="store_true", help="read the nearest aligned member's difference too")
    ap.add_argument("--shift", action="store_true", help="read how far each position's alignment moved too")
    ap.add_argument("--upsample", type=int, default=1, help="members' keys and values at this many points a sample")
    ap.add_argument(
        "--alone-steps", type=int, default=0, help="first steps train the reader alone (no retriever residual)"
    )
    ap.add_argument("--init-identity", action="store_true", help="query/key projections start as the identity")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--top", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--trunk-lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--M", type=int, default=50)
    ap.add_argument("--split", default="dev", choices=["dev", "test", "both"])
    ap.add_argument(
        "--space",
        default="default",
        choices=["default", "100k"],
        help="100k: 100,000 items in 10,000 clusters (seed 7); test = its first 200 queries, dev = the other 100",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--train-worlds",
        type=int,
        default=0,
        help="train on this many fresh sets of the bootstrap's 4,000 prototypes each (seeds 11, 12, ...; the "
        "retriever never saw them), a step's queries all from one set: more clusters to learn from, with candidate "
        "lists as dense as the bootstrap's",
    )
    ap.add_argument("--load", help="skip training: measure the weights a run saved beside its --out (.pt)")
    ap.add_argument(
        "--alpha-scales",
        help="e.g. 0.5,1,2: also rerank with the residual's weight times each; the best on dev (recall@1) is "
        "reported on test too",
    )
    ap.add_argument("--eval-members", type=int, help="the rerank reads this many sampled members of each cluster")
    ap.add_argument(
        "--eval-first",
        help="N:KEEP: measure a two-stage cascade instead: the reader on N sampled members of FAISS top M keeps its "
        "best KEEP, which it reads whole",
    )
    ap.add_argument(
        "--teacher-weight",
        type=float,
        default=0.0,
        help="train on this mix of the generator's exact group posterior (lab.exact_teacher) and the hard label",
    )
    ap.add_argument("--teacher-temp", type=float, default=1.0, help="the teacher's log-likelihoods divided by this")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("PRUNECASCADE_TORCH_THREADS", "1")))
    torch.manual_seed(args.seed)
    out: dict = {"args": vars(args), "load_start": os.getloadavg()}

    retriever = load_retriever()
    retriever.requires_grad_(False)
    train, _ = prototype_training_sets(PairConfig())
    worlds = [make_prototype_set(replace(PairConfig().train, seed=11 + w), "train") for w in range(args.train_worlds)]
    held = make_prototype_set(PrototypeConfig(num_prototypes=4000, seed=7), "val")
    t0 = time.perf_counter()
    all_groups = [Groups(t, retriever) for t in (worlds or [train])]
    tr_groups, held_groups = all_groups[0], Groups(held, retriever)
    rng = np.random.default_rng([args.seed, 1])
    vrng = np.random.default_rng([args.seed, 2])
    # fixed diagnostics: own cluster vs the retriever's whole top `top` (like the product's group_top1)
    tr_fixed = [tr_groups.sample(32, 0, args.top, vrng, whole_top=True) for _ in range(4)]
    held_fixed = [held_groups.sample(32, 0, args.top, vrng, whole_top=True) for _ in range(4)]
    alpha_batches = [tr_groups.sample(64, args.group, args.top, vrng) for _ in range(4)]
    alpha = fit_alpha(alpha_batches)
    sample = torch.from_numpy(train.x[:: max(1, len(train.x) // 4000)])
    trunk = MemberFeatures(retriever, args.feature, args.trainable, sample)
    with torch.no_grad():
        shape = trunk(sample[:1]).shape
    reader = ClusterReader(
        shape[2],
        shape[1],
        args.mode,
        args.d,
        args.dv,
        args.hidden,
        args.max_shift,
        args.context,
        args.nearest,
        args.shift,
        args.upsample,
    )
    with torch.no_grad():
        reader.log_alpha.fill_(math.log(alpha))
    if args.init_identity:
        reader.init_identity()
    model = ReaderRanker(trunk, reader)
    out["alpha_init"] = alpha
    out["feature_shape"] = list(shape[1:])
    out["flops_per_pair"] = reader.flops_per_pair(10)
    if args.eval_members:
        out["flops_per_pair_eval"] = reader.flops_per_pair(args.eval_members)
    if args.eval_first:
        n1, keep = (int(v) for v in args.eval_first.split(":"))
        out["flops_per_query_eval"] = args.M * reader.flops_per_pair(n1) + keep * out["flops_per_pair"]
        out["flops_per_query_whole"] = args.M * out["flops_per_pair"]
    values = args.dv if args.mode != "maxsim" else 0
    out["item_cache_floats_per_cluster"] = 10 * reader.item_length * (args.d + values)
    used = {"raw": [], "c1": [trunk.conv1], "c2": [trunk.conv1, trunk.conv2], "b2": [trunk.conv1, trunk.conv2]}
    trunk_params = sum(p.numel() for m in used[args.feature] for p in m.parameters()) if args.trainable else 0
    out["params"] = sum(p.numel() for p in reader.parameters()) + trunk_params  # trained ones
    print(json.dumps({k: out[k] for k in ("alpha_init", "feature_shape", "flops_per_pair", "params")}), flush=True)

    groups = [
        {"params": [p for n, p in reader.named_parameters() if n != "log_alpha"], "lr": args.lr},
        {"params": [reader.log_alpha], "lr": args.lr, "weight_decay": 0.0},
    ]
    if args.trainable:
        groups.append({"params": [p for p in trunk.parameters() if p.requires_grad], "lr": args.trunk_lr})
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    total = max(args.steps, 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[gr["lr"] for gr in groups], total_steps=total, pct_start=0.1
    )
    traj = []
    teacher = None
    if args.teacher_weight > 0:
        if args.train_worlds:
            raise SystemExit("--teacher-weight trains on the bootstrap's own training prototypes only")
        teacher = ExactTeacher(train.prototypes)
        q, _, _, clusters = tr_groups.sample_with_ids(512, args.group, args.top, np.random.default_rng([args.seed, 4]))
        out["teacher_group_top1"] = float((teacher.log_posterior(q, clusters).argmax(1) == 0).float().mean())
        print(json.dumps({"teacher_group_top1": out["teacher_group_top1"]}), flush=True)

    def diag(step: int, loss: float) -> None:
        model.residual = False
        alone = group_top1(model, held_fixed)
        model.residual = True
        row = {
            "held_alone_top1": alone,
            "step": step,
            "loss": round(loss, 4),
            "train_top1": group_top1(model, tr_fixed),
            "held_top1": group_top1(model, held_fixed),
            "alpha": round(reader.log_alpha.exp().item(), 2),
            "seconds": round(time.perf_counter() - t0, 1),
            "load": os.getloadavg()[0],
        }
        traj.append(row)
        print(json.dumps(row), flush=True)

    if args.load:
        model.load_state_dict(torch.load(args.load))
        args.steps = 0
    else:
        diag(0, float("nan"))
    run = 0.0
    for step in range(1, args.steps + 1):
        model.train()
        if step == args.alone_steps + 1 and args.alone_steps > 0:
            with torch.no_grad():  # the residual joins: its multiple refitted against the reader's scores
                reader.log_alpha.fill_(math.log(fit_alpha(alpha_batches, model)))
            out["alpha_refit"] = reader.log_alpha.exp().item()
            print("alpha refit", out["alpha_refit"], flush=True)
        model.residual = step > args.alone_steps
        reader.log_alpha.requires_grad_(model.residual)
        world = all_groups[int(rng.integers(len(all_groups)))] if len(all_groups) > 1 else tr_groups
        q, members, rs, clusters = world.sample_with_ids(args.batch, args.group, args.top, rng)
        keys = model.scores(q, members, rs)
        loss = listwise_loss(keys)
        if teacher is not None:
            target = teacher.log_posterior(q, clusters, args.teacher_temp)
            loss = (1 - args.teacher_weight) * loss + args.teacher_weight * soft_cross_entropy(keys, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run = 0.98 * run + 0.02 * loss.item() if step > 1 else loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            diag(step, run)
    out["train_seconds"] = round(time.perf_counter() - t0, 1)
    out["trajectory"] = traj
    out["load_after_training"] = os.getloadavg()
    if not args.load:
        torch.save(model.state_dict(), args.out.removesuffix(".json") + ".pt")

    if args.space == "100k":  # bench_pair's `prepare --prototypes 10000` space: its first 200 queries are the ones
        # docs/performance.md 0 reports (test here), the other 100 are dev
        space_cfg = PrototypeConfig(num_prototypes=10000, seed=7)
        xq, cq, yq = make_queries(space_cfg, 300, seed=7)
        halves = {"dev": slice(200, 300), "test": slice(0, 200)}
    else:  # the default space, its shipped queries: dev = odd positions, test = even
        space_cfg = PrototypeConfig(num_prototypes=2300)
        xq, cq, yq = make_queries(space_cfg, 500, seed=0)
        halves = {"dev": slice(1, None, 2), "test": slice(0, None, 2)}
    space = make_prototype_set(space_cfg, "space")
    t = time.perf_counter()
    for split in ["dev", "test"] if args.split == "both" else [args.split]:
        s = halves[split]
        first = tuple(int(v) for v in args.eval_first.split(":")) if args.eval_first else None
        scales = tuple(float(a) for a in args.alpha_scales.split(",")) if args.alpha_scales and not first else ()
        faiss_rows, rows, alone_rows, scaled, model_ms = rerank(
            model,
            retriever,
            space,
            xq[s],
            cq[s],
            yq[s],
            args.M,
            members=args.eval_members,
            first=first,
            seed=args.seed,
            alpha_scales=scales,
        )
        diff = np.array(rows)[:, 0] - np.array(faiss_rows)[:, 0]
        out[split] = {
            "faiss": summary(faiss_rows),
            "reader": summary(rows),
            "reader_alone": summary(alone_rows),
            **r1_gain(rows, faiss_rows),
            "better_worse": [int((diff > 0).sum()), int((diff < 0).sum())],
            "per_query": {"faiss": faiss_rows, "reader": rows},
            "model_ms_per_query": round(model_ms, 2),
        }
        if scales:
            out[split]["alpha_scan"] = {str(a): summary(r) for a, r in scaled.items()}
            r1 = {a: np.mean(r, 0)[0] for a, r in scaled.items()}
            if split == "dev":  # chosen on dev only (ties: the scale nearest 1); test then reports that choice
                out["alpha_scale_chosen"] = max(scales, key=lambda a: (r1[a], -abs(math.log(a))))
            a = out.get("alpha_scale_chosen")
            if a is not None:
                out[split]["reader_alpha_chosen"] = {"scale": a, **summary(scaled[a]), **r1_gain(scaled[a], faiss_rows)}
        print(split, json.dumps({k: v for k, v in out[split].items() if k != "per_query"}), flush=True)
    out["eval_seconds"] = round(time.perf_counter() - t, 1)
    out["load_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
