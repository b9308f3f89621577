"""Does the shipped dense pair-model recipe beat FAISS alone when trained longer, wider, or on more clusters?

Trains the dense pair model exactly as the bootstrap does (`cascade.bootstrap.train_dense_pair`'s two phases:
`train_pair_model` pointwise, then `train_pair_listwise` on the retriever's candidate lists), with the home's
retriever (`$PRUNECASCADE_HOME`'s `pair-dense` retriever copy), and measures the rerank of FAISS top M on the
default space's shipped queries (`make_queries(PrototypeConfig(num_prototypes=2300), 500, seed=0)`: dev = odd
positions, test = even), every member of each candidate, member logits averaged (`mean_logit`), ranked by the
served ranking key (expected gain, gains 0/1/3). The product's selection of checkpoints (validation groups /
pairs) is left as it is; besides, every validation the training functions run is recorded together with the same
measure on training data (training groups / pairs drawn the same way), so over- and under-fitting show, and the
dev rerank is measured at the selected weights and at the last step of each phase.

    PYTHONPATH=. OMP_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1 PRUNECASCADE_HOME=/work/homes/h2 \\
        nice -n 5 python -m lab.pair_scaling --pointwise 400 --listwise 100 --out /work/scratch-s7/scale/r400.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace

import numpy as np
import torch

import models.pair_training as pt
from cascade.bootstrap import new_pair_model, prototype_training_sets
from cascade.bootstrap_config import PairConfig
from lab.reranker_study import faiss_order, load_retriever, metrics
from models.biencoder import BiEncoder, BiEncoderSpec, embed_numpy
from models.pair import default_pair_spec
from models.pair_training import (
    default_grade_gains,
    make_pairs,
    ranking_key,
    retriever_lists,
    sample_groups,
)
from models.prototypes import (
    PrototypeConfig,
    make_prototype_set,
    make_queries,
    similar_prototypes,
)

PER_QUERY: list[list[tuple[float, float, float]]] = []  # every measurement's per-query (R@1, R@10, nDCG@10)


class Recorder:
    """Wraps the validation measures the product's training functions call (`pair_accuracy`, `group_top1`),
    recording each call's value, the same measure on training data, and the weights at that call."""

    def __init__(self) -> None:
        self.phase = ""
        self.train_pairs = None
        self.train_batches = None
        self.held_pairs = None
        self.held_batches = None
        self.rows: list[dict] = []
        self.states: list[dict] = []
        self._pair_accuracy = pt.pair_accuracy
        self._group_top1 = pt.group_top1
        self.t0 = time.perf_counter()

    def pair_accuracy(self, model, pairs):
        val = self._pair_accuracy(model, pairs)
        tr = self._pair_accuracy(model, self.train_pairs) if self.train_pairs is not None else float("nan")
        held = self._pair_accuracy(model, self.held_pairs) if self.held_pairs is not None else float("nan")
        self._log(model, val, tr, held, "pair_acc")
        return val

    def group_top1(self, model, batches):
        val = self._group_top1(model, batches)
        tr = self._group_top1(model, self.train_batches) if self.train_batches is not None else float("nan")
        held = self._group_top1(model, self.held_batches) if self.held_batches is not None else float("nan")
        self._log(model, val, tr, held, "group_top1")
        return val

    def _log(self, model, val, tr, held, what) -> None:
        row = {
            "phase": self.phase,
            "call": len(self.rows),
            "what": what,
            "val": val,
            "train": tr,
            "held": held,
        }
        self.rows.append(row)
        self.states.append(copy.deepcopy(model.state_dict()))
        print(json.dumps(self.rows[-1]), flush=True)


@torch.no_grad()
def rerank_metrics(model, space, emb_space, xq, cq, yq, m: int) -> tuple[float, float, float]:
    """R@1, R@10, nDCG@10 of the dense rerank of FAISS top m (every member, mean_logit, ranking key)."""
    model.eval()
    k = len(space.prototypes)
    views = space.prototypes.config.views
    mu = emb_space.reshape(k, views, -1).mean(1)
    order, _ = faiss_order(embed_numpy(model.retriever, xq), mu)
    items = torch.from_numpy(space.x)
    offsets = np.arange(k + 1) * views
    context = model.cluster_context(items, offsets)
    inputs = model.item_inputs(items, context)
    gains = default_grade_gains(model.spec.num_grades)
    labels = space.prototypes.digit
    rows = []
    for i in range(len(xq)):
        top = order[i, :m]
        member_rows = (top[:, None] * views + np.arange(views)[None, :]).reshape(-1)
        prepared = model.prepare(torch.from_numpy(xq[i : i + 1]), len(member_rows))
        logits, _ = model.score_prepared(prepared, inputs[member_rows])
        agg = logits.reshape(m, views, -1).mean(1)
        key = ranking_key(torch.log_softmax(agg, -1), gains).numpy()
        new = np.concatenate([top[np.argsort(-key, kind="stable")], order[i, m:]])
        grades = np.where(np.arange(k) == cq[i], 2, (labels == yq[i]).astype(np.int64))
        rows.append(metrics(new, grades))
    PER_QUERY.append(rows)
    return tuple(float(v) for v in np.mean(rows, 0).round(4))


def faiss_metrics(retriever, emb_space, space, xq, cq, yq):
    k = len(space.prototypes)
    mu = emb_space.reshape(k, space.prototypes.config.views, -1).mean(1)
    order, _ = faiss_order(embed_numpy(retriever, xq), mu)
    labels = space.prototypes.digit
    rows = [
        metrics(
            order[i],
            np.where(np.arange(k) == cq[i], 2, (labels == yq[i]).astype(np.int64)),
        )
        for i in range(len(xq))
    ]
    PER_QUERY.append(rows)
    return tuple(float(v) for v in np.mean(rows, 0).round(4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pointwise", type=int, default=400)
    ap.add_argument("--listwise", type=int, default=100)
    ap.add_argument("--train-protos", type=int, default=4000)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--trunk-layers", type=int, default=1)
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    ap.add_argument("--pw-lr", type=float, default=3e-3)
    ap.add_argument("--lw-lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--lw-eval-every", type=int, default=50)
    ap.add_argument("--pw-eval-every", type=int, default=250)
    ap.add_argument("--lw-queries", type=int, default=16)
    ap.add_argument(
        "--retriever",
        default="home",
        help="home, or a directory saved by save_biencoder",
    )
    ap.add_argument("--split", default="dev", choices=["dev", "test", "both"])
    ap.add_argument("--M", type=int, default=50)
    ap.add_argument("--eval-calls", default="selected,last", help="dev rerank at: selected,last,all")
    ap.add_argument(
        "--freeze-residual-pointwise",
        action="store_true",
        help="residual fixed in the pointwise phase",
    )
    ap.add_argument("--load", help="skip training: measure these weights (the .pt a run saves beside its --out)")
    ap.add_argument("--zero-residual", action="store_true", help="with --load: rank by the scorer alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("PRUNECASCADE_TORCH_THREADS", "1")))

    if args.retriever == "home":
        retriever = load_retriever()
    else:
        from models.biencoder import load_biencoder

        retriever = load_biencoder(args.retriever)
    encoder = BiEncoder(BiEncoderSpec(**{**retriever.spec.__dict__}))
    encoder.load_state_dict(retriever.state_dict())

    pair = PairConfig(train=PrototypeConfig(num_prototypes=args.train_protos))
    train, val = prototype_training_sets(pair)
    space_cfg = PrototypeConfig(num_prototypes=2300)
    space = make_prototype_set(space_cfg, "space")
    xq, cq, yq = make_queries(space_cfg, 500, seed=0)
    splits = {"dev": slice(1, None, 2), "test": slice(0, None, 2)}
    chosen = ["dev", "test"] if args.split == "both" else [args.split]
    queries = {s: (xq[splits[s]], cq[splits[s]], yq[splits[s]]) for s in chosen}
    emb_space = embed_numpy(retriever, space.x)

    out: dict = {"args": vars(args), "load_start": os.getloadavg()}
    out["faiss"] = {s: faiss_metrics(retriever, emb_space, space, *queries[s]) for s in chosen}
    out["per_query"] = {f"faiss_{s}": PER_QUERY[i] for i, s in enumerate(chosen)}
    print("faiss", out["faiss"], flush=True)

    spec = default_pair_spec(
        train.x.shape[1],
        hidden=tuple(args.hidden),
        trunk_channels=args.channels,
        trunk_layers=args.trunk_layers,
    )
    model = new_pair_model(spec, encoder)
    rec = Recorder()
    pt.pair_accuracy = rec.pair_accuracy  # the training functions look these names up in their module
    pt.group_top1 = rec.group_top1
    training = replace(
        pair.training,
        steps=args.pointwise,
        seed=args.seed,
        lr=args.pw_lr,
        weight_decay=args.weight_decay,
        eval_every=args.pw_eval_every,
    )
    listwise = replace(
        pair.listwise,
        steps=args.listwise,
        seed=args.seed,
        lr=args.lw_lr,
        weight_decay=args.weight_decay,
        eval_every=args.lw_eval_every,
        queries=args.lw_queries,
    )
    out["training"], out["listwise"] = training.__dict__, listwise.__dict__
    # training data measured the same way as validation: fixed pairs / groups of training prototypes, and of a
    # held-out set as large as the training set (the validation set has 800 clusters: its groups are easier)
    rng = np.random.default_rng([args.seed, 99])
    held = make_prototype_set(PrototypeConfig(num_prototypes=args.train_protos, seed=7), "val")
    if args.load:
        model.load_state_dict(torch.load(args.load))
        if args.zero_residual:
            with torch.no_grad():
                model.residual.weight.zero_()
                model.residual.bias.zero_()
        training, listwise = replace(training, steps=0), replace(listwise, steps=0)
    if training.steps > 0:
        neighbours = similar_prototypes(train.prototypes, training.hard_neighbours)
        rec.train_pairs = make_pairs(
            train,
            training.val_pairs,
            training.grade_mix,
            rng,
            neighbours,
            training.hard_fraction,
        )
        held_neighbours = similar_prototypes(held.prototypes, training.hard_neighbours)
        rec.held_pairs = make_pairs(
            held,
            training.val_pairs,
            training.grade_mix,
            rng,
            held_neighbours,
            training.hard_fraction,
        )
        rec.phase = "pointwise"
        t = time.perf_counter()
        if args.freeze_residual_pointwise:  # AdamW skips parameters without gradients (no decay either)
            model.residual.requires_grad_(False)
        model, report = pt.train_pair_model(model.spec, train, val, training, False, model=model)
        model.residual.requires_grad_(True)
        out["residual_after_pointwise"] = [
            model.residual.weight.squeeze(1).tolist(),
            model.residual.bias.tolist(),
        ]
        out["pointwise_seconds"] = time.perf_counter() - t
        out["pointwise_report"] = report.__dict__
        print("pointwise", report, flush=True)
    pw_calls = len(rec.rows)
    if listwise.steps > 0:
        lists = retriever_lists(train, model.retriever)
        vcfg = replace(listwise, group=listwise.top + 1)
        rec.train_batches = [sample_groups(lists, model.retriever, 64, vcfg, rng) for _ in range(4)]
        held_lists = retriever_lists(held, model.retriever)
        rec.held_batches = [sample_groups(held_lists, model.retriever, 64, vcfg, rng) for _ in range(4)]
        rec.phase = "listwise"
        t = time.perf_counter()
        model, report = pt.train_pair_listwise(model, train, val, listwise, False)
        out["listwise_seconds"] = time.perf_counter() - t
        out["listwise_report"] = report.__dict__
        print("listwise", report, flush=True)
    out["trajectory"] = rec.rows
    out["train_seconds"] = out.get("pointwise_seconds", 0.0) + out.get("listwise_seconds", 0.0)

    # dev rerank at chosen weights
    evals: dict[str, dict] = {}
    evals["selected"] = {s: rerank_metrics(model, space, emb_space, *queries[s], args.M) for s in chosen}
    print("selected", evals["selected"], flush=True)
    out["per_query"].update({f"selected_{s}": PER_QUERY[-len(chosen) + i] for i, s in enumerate(chosen)})
    if not args.load:
        torch.save(model.state_dict(), args.out.removesuffix(".json") + ".pt")
    want = args.eval_calls.split(",")
    calls: list[tuple[str, int]] = []
    if "last" in want:
        if pw_calls:
            calls.append(("pointwise_last", pw_calls - 1))
        if len(rec.rows) > pw_calls:
            calls.append(("listwise_last", len(rec.rows) - 1))
    if "all" in want:
        calls += [(f"call{i}", i) for i in range(len(rec.rows))]
    probe = copy.deepcopy(model)
    for name, i in calls:
        probe.load_state_dict(rec.states[i])
        evals[name] = {s: rerank_metrics(probe, space, emb_space, *queries[s], args.M) for s in chosen}
        evals[name]["call"] = rec.rows[i]
        print(name, evals[name], flush=True)
    out["rerank"] = evals
    out["load_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
