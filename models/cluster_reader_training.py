"""Training a cluster reader (`models.cluster_reader`) by localized contrastive estimation on its retriever's own
candidate lists: a query is a fresh view of a training cluster (on a user's clusters it would be a held-out
member); its group is its own cluster and `group - 1` clusters drawn from the retriever's top `top` for it (by
default the whole top 10 that it reads when served); the loss is the softmax cross-entropy of the keys with the own
cluster as target.

The reader first trains alone (`alone_steps`, no residual); then the retriever's score joins as a residual, its
multiple refitted against the reader's scores, and both train together. At the end the multiple is refitted once
more, on held-out clusters: the retriever was trained on the training clusters, so there its score looks better
than on new ones, and a multiple fitted there drowns the reader at serving (on a user's digits, dev recall@1 0.920
at the trained multiple, 0.952 at the held-out one; docs/performance.md). Nothing here knows the generator's grid
or noise model: it reads sets of members and a retriever. The recipe and its measurements: lab/CLUSTER_READER.md."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.biencoder import BiEncoder, embed_numpy
from models.cluster_reader import ReaderRanker, ReaderSpec, build_ranker, listwise_loss
from models.pair_training import retriever_lists
from models.prototypes import MemberPool, PrototypeSet, make_views

__all__ = ["ReaderTrainConfig", "Groups", "fit_alpha", "group_top1", "train_reader"]


@dataclass(frozen=True)
class ReaderTrainConfig:
    steps: int = 48000
    """Three times the 16,000 steps of sessions 9-23. Against 32,000, chosen by a rule fixed before the second seed's
    results: 366 dev queries won and 296 lost on recall@1, over 3,400 dev queries and two seeds of each
    (two-sided p = 0.007; docs/performance.md section 0, "A third set of fresh queries")."""
    alone_steps: int = 36000
    """The first three quarters train the reader alone; the residual joins after them (lab/CLUSTER_READER.md: 12,000
    of 16,000 steps gave dev recall@1 +0.112 over FAISS alone on the default space)."""
    batch: int = 16
    group: int = 11
    top: int = 10
    """A query's group is its own cluster and `group - 1` of the retriever's top `top` for it: by default all of
    FAISS's top 10, the lists the reader reads when served. Against 15 of the top 32 (the lab's first recipe) the
    same steps gave the same dev recall@1 at two thirds of the time (lab/CLUSTER_READER.md, session 21)."""
    lr: float = 2e-3
    weight_decay: float = 1e-4
    init_identity: bool = True
    seed: int = 0
    held_out_alpha: bool = True
    """The residual's multiple serves as refitted on held-out clusters at the end (False: as trained, the recipe
    before session 22; module docstring)."""


class Groups:
    """The retriever's own candidate lists of a training set. On rendered prototypes a query is a fresh view and
    every cluster is read whole (its `views` members); on a user's clusters (a `MemberPool`) a query is one of its
    cluster's stored members, held out: its own cluster is read without it (and its centroid is the other
    members'), and every cluster through `views` = the smallest cluster's size - 1 of its members, drawn at random."""

    def __init__(self, data: PrototypeSet, retriever: BiEncoder) -> None:
        self.data, self.retriever = data, retriever
        self.lists = retriever_lists(data, retriever)
        self.k = len(self.lists.offsets) - 1
        self.sizes = np.diff(self.lists.offsets)
        self.held_out = isinstance(data.prototypes, MemberPool)
        self.views = int(self.sizes.min()) - (1 if self.held_out else 0)
        if self.views < 1:
            raise ValueError("every cluster needs two or more members to hold one out as a query")

    def sample(
        self, b: int, g: int, top: int, rng: np.random.Generator, whole_top: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(queries (b, D), members (b, G, views, D), retriever scores (b, G)): the own cluster first, then
        g - 1 of the retriever's top `top` (all of them with `whole_top`). The score is minus the squared distance
        from the query's embedding to the cluster's mean embedding, as FAISS ranks."""
        return self.sample_with_ids(b, g, top, rng, whole_top)[:3]

    def sample_with_ids(
        self, b: int, g: int, top: int, rng: np.random.Generator, whole_top: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """`sample`, and the groups' cluster ids (b, G), for whoever scores the same groups another way."""
        qid = rng.integers(0, self.k, size=b)
        c = self.lists.centroids
        if self.held_out:
            row = self.lists.offsets[qid] + (rng.random(b) * self.sizes[qid]).astype(np.int64)
            q = np.ascontiguousarray(self.data.x[row])
            eq = self.lists.embedding[row].astype(np.float64)
            n = self.sizes[qid][:, None]
            own_centroid = (c[qid] * n - eq) / (n - 1)  # the cluster as the space holds it: without the query
        else:
            row = None
            q = make_views(self.data.prototypes, qid, rng)
            eq = embed_numpy(self.retriever, q).astype(np.float64)
            own_centroid = c[qid]
        dist = (eq**2).sum(1)[:, None] + (c**2).sum(1)[None] - 2 * eq @ c.T
        own = ((eq - own_centroid) ** 2).sum(1)
        dist[np.arange(b), qid] = np.inf
        near = np.argsort(dist, axis=1)[:, :top]
        if whole_top:
            cand = np.concatenate([qid[:, None], near], 1)
        else:
            picks = np.stack([rng.choice(near[i], g - 1, replace=False) for i in range(b)])
            cand = np.concatenate([qid[:, None], picks], 1)
        rs = -np.take_along_axis(dist, cand, 1)
        rs[:, 0] = -own
        rows = self._member_rows(cand, row, rng)
        return (
            torch.from_numpy(q),
            torch.from_numpy(np.ascontiguousarray(self.data.x[rows])),
            torch.from_numpy(rs.astype(np.float32)),
            cand,
        )

    def _member_rows(self, cand: np.ndarray, query_row: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        """(b, G, views) rows of the members read: a cluster's first `views` (rendered prototypes: all of them),
        or `views` drawn at random, never the held-out query."""
        starts = self.lists.offsets[cand]
        if query_row is None:
            return starts[..., None] + np.arange(self.views)
        widest = int(self.sizes.max())
        keys = rng.random((*cand.shape, widest))
        keys[np.arange(widest)[None, None, :] >= self.sizes[cand][..., None]] = np.inf  # beyond the cluster
        keys[np.arange(len(cand)), 0, query_row - starts[:, 0]] = np.inf  # the query is not its own member
        return starts[..., None] + np.argsort(keys, axis=2)[..., : self.views]


@torch.no_grad()
def group_top1(model: ReaderRanker, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """How often the own cluster gets the highest key in its group."""
    model.eval()
    return float(np.mean([(model.scores(*bt).argmax(1) == 0).float().mean().item() for bt in batches]))


@torch.no_grad()
def fit_alpha(
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], model: ReaderRanker | None = None
) -> float:
    """The retriever score's multiple that minimises the groups' softmax cross-entropy, with the reader's scores as
    they are (at zero without a model)."""
    grid = np.exp(np.linspace(np.log(1.0), np.log(1000.0), 61))
    rs = torch.cat([bt[2] for bt in batches])
    base = torch.zeros_like(rs)
    if model is not None:
        model.eval()
        model.residual = False
        base = torch.cat([model.scores(*bt) for bt in batches])
        model.residual = True
    target = torch.zeros(len(rs), dtype=torch.long)
    losses = [F.cross_entropy(base + a * rs, target).item() for a in grid]
    return float(grid[int(np.argmin(losses))])


def train_reader(
    spec: ReaderSpec,
    retriever: BiEncoder,
    train: PrototypeSet,
    held: PrototypeSet,
    config: ReaderTrainConfig = ReaderTrainConfig(),
    progress: Callable[[dict], None] | None = None,
    every: int = 500,
) -> tuple[ReaderRanker, dict]:
    """A reader trained on `train`'s retriever lists, its features copied from `retriever`; `progress` gets a row
    of diagnostics every `every` steps (group top-1 on `held`, whose clusters it never trains on). Returns the
    reader (weights of the last step: nothing is selected) and a record of its training."""
    torch.manual_seed(config.seed)
    retriever = retriever.eval().requires_grad_(False)
    started = time.perf_counter()
    if not 1 <= config.group - 1 <= config.top:
        raise ValueError(f"a group reads its own cluster and 1 to top = {config.top} others, not {config.group - 1}")
    tr_groups, held_groups = Groups(train, retriever), Groups(held, retriever)
    for name, groups in (("training", tr_groups), ("held-out", held_groups)):
        if groups.k <= config.top:  # the own cluster would be drawn as one of its own negatives
            raise ValueError(
                f"the reader's {name} set has {groups.k} clusters: its groups draw from the retriever's top "
                f"{config.top} other clusters, so it needs at least {config.top + 1}"
            )
    rng = np.random.default_rng([config.seed, 1])
    fixed = np.random.default_rng([config.seed, 2])
    held_fixed = [held_groups.sample(32, 0, config.top, fixed, whole_top=True) for _ in range(4)]
    alpha_batches = [tr_groups.sample(64, config.group, config.top, fixed) for _ in range(4)]
    # the served lists of clusters the retriever never trained on: where the residual's final multiple is fitted
    held_alpha = [held_groups.sample(64, 0, config.top, fixed, whole_top=True) for _ in range(8)]
    sample = torch.from_numpy(train.x[:: max(1, len(train.x) // 4000)])
    model = build_ranker(spec, sample, retriever)
    reader = model.reader
    with torch.no_grad():
        reader.log_alpha.fill_(math.log(fit_alpha(alpha_batches)))
    if config.init_identity:
        reader.init_identity()
    alpha_start = reader.log_alpha.exp().item()
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in reader.named_parameters() if n != "log_alpha"], "lr": config.lr},
            {"params": [reader.log_alpha], "lr": config.lr, "weight_decay": 0.0},
        ],
        weight_decay=config.weight_decay,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[config.lr, config.lr], total_steps=max(config.steps, 1), pct_start=0.1
    )
    rows: list[dict] = []
    running = math.nan
    for step in range(1, config.steps + 1):
        if step == config.alone_steps + 1 and config.alone_steps > 0:
            with torch.no_grad():  # the residual joins: its multiple refitted against the reader's scores
                reader.log_alpha.fill_(math.log(fit_alpha(alpha_batches, model)))
        model.train()
        model.residual = step > config.alone_steps
        reader.log_alpha.requires_grad_(model.residual)
        loss = listwise_loss(model.scores(*tr_groups.sample(config.batch, config.group, config.top, rng)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        if step % every == 0 or step == config.steps:
            model.residual = True
            row = {
                "step": step,
                "loss": round(running, 4),
                "held_top1": round(group_top1(model, held_fixed), 4),
                "alpha": round(reader.log_alpha.exp().item(), 3),
                "seconds": round(time.perf_counter() - started, 1),
            }
            rows.append(row)
            if progress is not None:
                progress(row)
    alpha_trained = reader.log_alpha.exp().item()
    if config.held_out_alpha:
        with torch.no_grad():  # the multiple as it serves: fitted on held-out clusters (module docstring)
            reader.log_alpha.fill_(math.log(fit_alpha(held_alpha, model)))
    elif 0 < config.steps <= config.alone_steps:  # trained alone throughout: the multiple still fits it
        with torch.no_grad():
            reader.log_alpha.fill_(math.log(fit_alpha(alpha_batches, model)))
    model.residual = True
    model.eval()
    record = {
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "alpha_start": round(alpha_start, 4),
        "alpha_trained": round(alpha_trained, 4),
        "alpha_served": round(reader.log_alpha.exp().item(), 4),
        "seconds": round(time.perf_counter() - started, 1),
        "trajectory": rows,
        "train_clusters": tr_groups.k,
    }
    return model, record
