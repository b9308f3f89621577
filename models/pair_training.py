"""Training pair models on prototype views: fresh (q view, x view, grade) pairs every step.

The grade mix of the training pairs is fixed (hard negatives included: grade 1 pairs are views of another
prototype of the same digit) and recorded as `grade_prior`, the pi that Bayes aggregation over n members divides out:
log p(g | x_1..x_n) = sum_i log p(g | x_i) - (n - 1) log pi(g).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models.pair import PairNetwork, PairSpec, default_pair_spec
from models.pair_evaluation import PairBatch, pair_accuracy, pair_logits
from models.prototypes import MemberPool, PrototypeSet, draw_view_pairs, make_views, similar_prototypes
from models.training import reapply_masks

__all__ = [
    "PairBatch",
    "PairTrainConfig",
    "PairTrainReport",
    "DEFAULT_PAIR_TRAINING",
    "sample_pair_ids",
    "make_pairs",
    "make_groups",
    "group_recall",
    "group_grade_prior",
    "pair_calibration",
    "pair_accuracy",
    "pair_logits",
    "train_pair_model",
    "instance_auc",
    "pair_spec_for",
    "ListwiseConfig",
    "DEFAULT_LISTWISE",
    "RetrieverLists",
    "GroupBatch",
    "retriever_lists",
    "sample_groups",
    "group_logits",
    "ranking_key",
    "listwise_loss",
    "group_top1",
    "train_pair_listwise",
    "distillation_loss",
]


@dataclass(frozen=True)
class PairTrainConfig:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    grade_mix: tuple[float, float, float] = (0.2, 0.4, 0.4)
    """Fractions of grade 0, 1, 2 pairs in every batch; it is the grade prior of the trained model."""
    hard_fraction: float = 0.5
    """Fraction of grade 1 pairs whose item is one of the `hard_neighbours` most similar prototypes of the
    same digit (hard negatives); the rest are any other prototype of the digit."""
    hard_neighbours: int = 10
    listwise: float = 0.0
    """> 0: batches are groups (one query view, its own prototype and `group_size - 1` others: hard
    neighbours with probability `hard_fraction`, else any prototype of the same digit or another one, half
    and half), and the loss adds `listwise` x a softmax cross-entropy over each group's log p(grade 2) with
    the own prototype as target (a ranking loss, as retrieve-and-rerank cross-encoders are trained). The
    grade prior is then the groups' grade frequencies, and checkpoints are chosen by validation group
    recall@1."""
    group_size: int = 16
    eval_every: int = 250
    val_pairs: int = 3000
    seed: int = 0
    progress: bool = False


DEFAULT_PAIR_TRAINING = PairTrainConfig()


@dataclass(frozen=True)
class PairTrainReport:
    steps_run: int
    best_step: int
    val_accuracy: float
    grade_prior: tuple[float, ...]
    seconds: float


def sample_pair_ids(
    labels: np.ndarray,
    count: int,
    grade_mix: tuple[float, ...],
    rng: np.random.Generator,
    neighbours: np.ndarray | None = None,
    hard_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prototype ids (query, item) and grades: 2 same prototype, 1 another prototype of the same digit,
    0 a prototype of another digit. `labels` is the digit of every prototype. With `neighbours` ((K, h)
    similar prototypes of the same digit), a `hard_fraction` of grade 1 items is one of them."""
    labels = np.asarray(labels)
    k = len(labels)
    by_label = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    mix = np.asarray(grade_mix, dtype=np.float64)
    grade = rng.choice(len(mix), size=count, p=mix / mix.sum()).astype(np.int64)
    qid = rng.integers(0, k, size=count)
    xid = qid.copy()
    for i in np.flatnonzero(grade < 2):
        pool = by_label[int(labels[qid[i]])]
        if grade[i] == 1:
            if len(pool) < 2:
                grade[i] = 2
                continue
            j = qid[i]
            while j == qid[i]:
                j = pool[rng.integers(len(pool))]
            xid[i] = j
            if neighbours is not None and rng.random() < hard_fraction:
                xid[i] = neighbours[qid[i], rng.integers(neighbours.shape[1])]
        else:
            j = qid[i]
            while labels[j] == labels[qid[i]]:
                j = rng.integers(0, k)
            xid[i] = j
    return qid, xid, grade


def make_pairs(
    data: PrototypeSet,
    count: int,
    grade_mix: tuple[float, ...],
    rng: np.random.Generator,
    neighbours: np.ndarray | None = None,
    hard_fraction: float = 0.0,
) -> PairBatch:
    """`count` pairs of fresh views (never the set's stored items) of `data`'s prototypes; for a user's
    clusters (`MemberPool`), pairs of stored members, two different ones for a same-cluster pair. Grades above
    `data.num_grades - 1` merge into it (without instance structure the own cluster is one of its label)."""
    qid, xid, grade = sample_pair_ids(data.cluster_labels, count, grade_mix, rng, neighbours, hard_fraction)
    q, x = draw_view_pairs(data.prototypes, qid, xid, rng)
    grade = np.minimum(grade, data.num_grades - 1)
    return PairBatch(torch.from_numpy(q), torch.from_numpy(x), torch.from_numpy(grade))


def group_grade_prior(config: PairTrainConfig) -> tuple[float, float, float]:
    """Expected grade frequencies of listwise groups (the prior Bayes aggregation divides out)."""
    m, h = config.group_size, config.hard_fraction
    p2 = 1 / m
    p1 = (1 - p2) * (h + (1 - h) * 0.5)
    return (1 - p2 - p1, p1, p2)


def make_groups(
    data: PrototypeSet, groups: int, size: int, rng: np.random.Generator, neighbours: np.ndarray, hard: float
) -> PairBatch:
    """`groups` x `size` pairs, query-major: pair g * size + 0 is the positive of group g."""
    labels = data.cluster_labels
    k = len(labels)
    qid = rng.integers(0, k, size=groups)
    cand = np.empty((groups, size), dtype=np.int64)
    cand[:, 0] = qid
    by_label = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    for g in range(groups):
        for j in range(1, size):
            u = rng.random()
            if u < hard:
                cand[g, j] = neighbours[qid[g], rng.integers(neighbours.shape[1])]
            elif u < hard + (1 - hard) / 2:
                pool = by_label[int(labels[qid[g]])]
                cand[g, j] = pool[rng.integers(len(pool))]
            else:
                cand[g, j] = rng.integers(0, k)
    cand[:, 1:][cand[:, 1:] == qid[:, None]] = (
        neighbours[qid, 0].repeat(size - 1).reshape(groups, -1)[cand[:, 1:] == qid[:, None]]
    )
    if isinstance(data.prototypes, MemberPool):  # the positive is another member than the query's
        pool = data.prototypes
        qrow = pool.draw_rows(qid, rng)
        q = np.repeat(pool.x[qrow], size, axis=0)
        x = pool.x[pool.draw_rows(cand.reshape(-1), rng, avoid=np.repeat(qrow, size))]
    else:
        q = np.repeat(make_views(data.prototypes, qid, rng), size, axis=0)
        x = make_views(data.prototypes, cand.reshape(-1), rng)
    same = labels[cand] == labels[qid][:, None]
    grade = np.where(cand == qid[:, None], 2, same.astype(np.int64)).reshape(-1)
    grade = np.minimum(grade, data.num_grades - 1)
    return PairBatch(torch.from_numpy(q), torch.from_numpy(x), torch.from_numpy(grade))


@torch.no_grad()
def group_recall(model: PairNetwork, groups: PairBatch, size: int) -> float:
    """Fraction of groups whose own prototype (first pair) has the highest log p(grade 2)."""
    logp = torch.log_softmax(pair_logits(model, groups), 1)[:, 2].reshape(-1, size)
    return float((logp.argmax(1) == 0).float().mean())


def pair_calibration(
    train: PrototypeSet, size: int = 512, seed: int = 0, grade_mix: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
) -> PairBatch:
    """Pairs for pruning (the limited-data regime: a few hundred), drawn by seed from training prototypes."""
    return make_pairs(train, size, grade_mix, np.random.default_rng([seed, 7]))


def train_pair_model(
    spec: PairSpec,
    train: PrototypeSet,
    val: PrototypeSet,
    config: PairTrainConfig = DEFAULT_PAIR_TRAINING,
    progress: bool | None = None,
    model: PairNetwork | None = None,
    train_front: bool = True,
) -> tuple[PairNetwork, PairTrainReport]:
    """Adam with one-cycle decay on fresh pairs each step; the weights with the best validation pair accuracy
    (fixed pairs of `val` prototypes) are kept. Pass `model` to fine-tune (e.g. a pruned variant) and
    `train_front=False` to train the scorer only: the trunk and normalisation stay those of the dense
    parent, so one cache of item features serves every variant."""
    if len(config.grade_mix) != spec.num_grades:
        raise ValueError("grade_mix needs one fraction per grade")
    if train.num_grades != spec.num_grades or val.num_grades != spec.num_grades:
        raise ValueError(f"the pair sets are graded {train.num_grades}-way, the model {spec.num_grades}-way")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 11])
    model = model if model is not None else PairNetwork(spec)
    neighbours = similar_prototypes(train.prototypes, config.hard_neighbours) if config.hard_fraction > 0 else None
    val_neighbours = similar_prototypes(val.prototypes, config.hard_neighbours) if config.hard_fraction > 0 else None
    val_rng = np.random.default_rng([config.seed, 13])
    val_pairs = make_pairs(val, config.val_pairs, config.grade_mix, val_rng, val_neighbours, config.hard_fraction)
    listwise = config.listwise > 0
    if listwise:
        if neighbours is None or val_neighbours is None:
            raise ValueError("listwise training needs hard_fraction > 0")
        m = config.group_size
        val_groups = make_groups(val, max(config.val_pairs // m, 1), m, val_rng, val_neighbours, config.hard_fraction)
    params = list(model.parameters()) if train_front else list(model.scorer.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss()
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    start = time.perf_counter()
    show = config.progress if progress is None else progress
    bar = tqdm(range(1, config.steps + 1), desc="train pair model", disable=not show, leave=False)
    for step in bar:
        model.train()
        if not train_front:
            model.trunk.eval()
            model.norm.eval()
        opt.zero_grad(set_to_none=True)
        if listwise:
            batch = make_groups(train, config.batch_size // m, m, rng, neighbours, config.hard_fraction)
            logits = model(batch.q, batch.x)
            rank_logits = torch.log_softmax(logits, 1)[:, 2].reshape(-1, m)
            target = torch.zeros(len(rank_logits), dtype=torch.long)
            loss = loss_fn(logits, batch.grade) + config.listwise * loss_fn(rank_logits, target)
        else:
            batch = make_pairs(train, config.batch_size, config.grade_mix, rng, neighbours, config.hard_fraction)
            loss = loss_fn(model(batch.q, batch.x), batch.grade)
        loss.backward()
        opt.step()
        sched.step()
        reapply_masks(model)
        if step % config.eval_every == 0 or step == config.steps:
            acc = group_recall(model, val_groups, m) if listwise else pair_accuracy(model, val_pairs)
            bar.set_postfix(val_acc=f"{acc:.3f}")
            if acc > best[0]:
                best = (acc, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    mix = np.asarray(group_grade_prior(config) if listwise else config.grade_mix, dtype=np.float64)
    prior = tuple(float(p) for p in mix / mix.sum())
    return model, PairTrainReport(config.steps, best[1], best[0], prior, time.perf_counter() - start)


@torch.no_grad()
def instance_auc(model: PairNetwork, val: PrototypeSet, seed: int = 0, pairs: int = 2000) -> float:
    """Whether the clusters carry instance structure a pair model can see: the AUC of log p(grade 2) between
    own-cluster pairs (two members of one cluster) and same-label pairs (members of two clusters of one label),
    on `val`'s clusters, which the model was not trained on. 0.5 = it cannot tell them apart; 1.0 = always.
    Ties count one half. NaN when `val` has no label with two clusters."""
    rng = np.random.default_rng([seed, 41])
    batch = make_pairs(val, pairs, (0.0, 0.5, 0.5), rng)
    if not bool((batch.grade == 1).any()) or not bool((batch.grade == 2).any()):
        return float("nan")
    score = torch.log_softmax(pair_logits(model, batch), 1)[:, 2].double().numpy()
    own, other = score[batch.grade.numpy() == 2], score[batch.grade.numpy() == 1]
    ranks = _midranks(np.concatenate([own, other]))
    return float((ranks[: len(own)].sum() - len(own) * (len(own) + 1) / 2) / (len(own) * len(other)))


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (the Mann-Whitney U statistic's ranks)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def pair_spec_for(input_dim: int, num_grades: int = 3, hidden: tuple[int, ...] = (256, 256)) -> PairSpec:
    """The default pair model's design (docs/premise.md: correlation over shifts, 4 regions, energies) for a
    user's feature length, which may be anything. The trunk pools so that at most 128 positions remain (the
    correlation's cost grows with the length, and wide inputs have the room); shifts reach a fifth of the pooled
    length, at most the default's 8 (8 of 40 on MNIST-1D), since a translation is a small part of the signal;
    the query's positions are cut into 4 regions when the pooled length divides by 4 into parts longer than a
    shift window's half, else 2, else 1 (regions must divide the length). A vector with no order along its
    features still gets a valid spec; the correlation then compares feature patterns at small offsets."""
    if input_dim < 1:
        raise ValueError("input_dim must be positive")
    pool = max(1, -(-input_dim // 128))
    length = input_dim // pool
    max_shift = min(8, length // 5)
    regions = next((r for r in (4, 2) if length % r == 0 and length // r > max_shift), 1)
    return default_pair_spec(input_dim, num_grades, max_shift=max_shift, pool=pool, regions=regions, hidden=hidden)


# -- listwise training on the retriever's own candidate lists -------------------------------------------------


@dataclass(frozen=True)
class ListwiseConfig:
    """Training a pair model (with a retriever, `PairSpec.retriever`) the way it serves: a query, its own
    cluster and `group - 1` clusters drawn from the retriever's top `top` for that query (its look-alikes:
    mostly the same label, so graded 1, the hard negatives), each read through `members` members whose logits
    are averaged (`mean_logit`, the stages' aggregation); loss = softmax cross-entropy of the served ranking key
    over each group with the own cluster as target (localized contrastive estimation) + `pointwise` x the
    cross-entropy of every cluster's aggregated posterior against its grade (so grade 1 and 0 stay apart)."""

    steps: int = 300
    queries: int = 16
    group: int = 8
    members: int = 2
    top: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    pointwise: float = 0.1
    eval_every: int = 50
    val_queries: int = 256
    """Validation groups hold the own cluster and all of the retriever's top `top` (the harder test), drawn once."""
    seed: int = 0
    progress: bool = False


DEFAULT_LISTWISE = ListwiseConfig()


@dataclass(frozen=True)
class RetrieverLists:
    """A set of clusters as the retriever sees it: the embedding of every stored member and FAISS's centroids
    (mean member embeddings), to draw the retriever's own candidate lists from."""

    data: PrototypeSet
    offsets: np.ndarray  # (K + 1,) rows of each cluster in data.x (grouped by cluster)
    embedding: np.ndarray  # (N, E) float32
    centroids: np.ndarray  # (K, E) float64


@dataclass(frozen=True)
class GroupBatch:
    """B groups of G clusters (the first of each group is the query's own), n members each."""

    q: torch.Tensor  # (B, D)
    eq: torch.Tensor  # (B, E) the queries' retriever embeddings
    x: torch.Tensor  # (B * G * n, D) members, group-major then cluster then member
    context: torch.Tensor  # (B * G * n, E) each member's cluster centroid (leave-one-out for the query's own)
    grade: torch.Tensor  # (B, G) int64
    members: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.grade.shape)  # type: ignore[return-value]


@torch.no_grad()
def retriever_lists(data: PrototypeSet, retriever: nn.Module) -> RetrieverLists:
    """Embed every stored member of `data` with the retriever (`embed`), and the clusters' mean embeddings."""
    cluster = np.asarray(data.cluster)
    if np.any(np.diff(cluster) < 0):
        raise ValueError("the set's items must be grouped by cluster")
    k = len(data.cluster_labels)
    offsets = np.searchsorted(cluster, np.arange(k + 1)).astype(np.int64)
    retriever.eval()
    x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
    emb = torch.cat([retriever.embed(x[i : i + 8192]) for i in range(0, len(x), 8192)]).numpy()  # type: ignore[operator]
    sums = np.add.reduceat(emb.astype(np.float64), offsets[:-1], axis=0)
    return RetrieverLists(data, offsets, emb, sums / np.diff(offsets)[:, None])


@torch.no_grad()
def sample_groups(
    lists: RetrieverLists, retriever: nn.Module, queries: int, config: ListwiseConfig, rng: np.random.Generator
) -> GroupBatch:
    """Queries of random clusters (a fresh view of a rendered prototype; for a user's clusters a stored member,
    left out of its own cluster's members and centroid), their own cluster and `group - 1` of the retriever's
    top `top` others, `members` random members of each."""
    data, offsets = lists.data, lists.offsets
    k = len(offsets) - 1
    g, n = min(config.group, k), config.members
    sizes = np.diff(offsets)
    qid = rng.integers(0, k, size=queries)
    pool = data.prototypes
    if isinstance(pool, MemberPool):
        qrow = pool.draw_rows(qid, rng)
        q = pool.x[qrow]
        eq = lists.embedding[qrow].astype(np.float64)
    else:
        qrow = None
        q = make_views(pool, qid, rng)
        eq = retriever.embed(torch.from_numpy(q)).double().numpy()  # type: ignore[operator]
    dist = (eq**2).sum(1)[:, None] + (lists.centroids**2).sum(1)[None, :] - 2 * eq @ lists.centroids.T
    dist[np.arange(queries), qid] = np.inf
    top = min(config.top, k - 1)
    near = np.argpartition(dist, top - 1, axis=1)[:, :top] if top < k - 1 else np.argsort(dist, axis=1)[:, :top]
    cand = np.empty((queries, g), dtype=np.int64)
    cand[:, 0] = qid
    for i in range(queries):
        cand[i, 1:] = rng.choice(near[i], g - 1, replace=False)
    flat = np.repeat(cand.reshape(-1), n)
    rows = offsets[flat] + (rng.random(len(flat)) * sizes[flat]).astype(np.int64)
    context = np.repeat(lists.centroids[cand.reshape(-1)], n, axis=0)
    if qrow is not None:  # the query is a stored member: not one of its cluster's members, nor in its centroid
        own = np.zeros((queries, g, n), dtype=bool)
        own[:, 0, :] = True
        own = own.reshape(-1)
        avoid = np.repeat(qrow, g * n)
        rows[own] = pool.draw_rows(flat[own], rng, avoid=avoid[own])  # type: ignore[union-attr]
        size = sizes[qid].astype(np.float64)[:, None]
        loo = (lists.centroids[qid] * size - eq) / np.maximum(size - 1, 1)
        context[own] = np.repeat(np.where(size > 1, loo, lists.centroids[qid]), n, axis=0)
    labels = data.cluster_labels
    grade = np.where(cand == qid[:, None], 2, (labels[cand] == labels[qid][:, None]).astype(np.int64))
    grade = np.minimum(grade, data.num_grades - 1)
    return GroupBatch(
        torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)),
        torch.from_numpy(eq.astype(np.float32)),
        torch.from_numpy(np.ascontiguousarray(data.x[rows], dtype=np.float32)),
        torch.from_numpy(context.astype(np.float32)),
        torch.from_numpy(grade),
        n,
    )


def group_logits(model: PairNetwork, batch: GroupBatch) -> torch.Tensor:
    """(B, G, grades): each cluster's members' logits averaged (`mean_logit`), the query read through the same
    forward as serving (`score_prepared` on cached item inputs computes the same function)."""
    b, g = batch.shape
    rep = torch.arange(b).repeat_interleave(g * batch.members)
    fq = model.query_features(batch.q)[rep]
    out = model.scorer.forward_with_hidden(model.interact(fq, model.item_features(batch.x)))
    logits, _ = model._with_residual(out, batch.eq[rep], batch.context)
    return logits.reshape(b, g, batch.members, -1).mean(2)


def ranking_key(log_post: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """The served ranking key (`cascade.target.ranking_key`, the log-odds of the expected gain), differentiable:
    log(sum_g p_g (u_g - min u)) - log(sum_g p_g (max u - u_g))."""
    low, high = gains - gains.min(), gains.max() - gains
    lo = log_post[..., low > 0] + low[low > 0].log()
    hi = log_post[..., high > 0] + high[high > 0].log()
    return torch.logsumexp(lo, -1) - torch.logsumexp(hi, -1)


def default_grade_gains(num_grades: int) -> torch.Tensor:
    """Gains of the default utility: (0, 1, 3) over three grades, (0, 1) over two (`cascade.queries`)."""
    return torch.tensor((0.0, 1.0, 3.0) if num_grades == 3 else tuple(float(g) for g in range(num_grades)))


def listwise_loss(logits: torch.Tensor, grade: torch.Tensor, pointwise: float) -> torch.Tensor:
    """Localized contrastive estimation over each group's ranking keys (the own cluster, position 0, is the
    target), plus `pointwise` x the grade cross-entropy of every cluster's posterior."""
    log_post = torch.log_softmax(logits, -1)
    keys = ranking_key(log_post, default_grade_gains(logits.shape[-1]).to(logits.dtype))
    lce = F.cross_entropy(keys, torch.zeros(len(keys), dtype=torch.long))
    if pointwise <= 0:
        return lce
    return lce + pointwise * F.nll_loss(log_post.reshape(-1, logits.shape[-1]), grade.reshape(-1))


@torch.no_grad()
def group_top1(model: PairNetwork, batches: list[GroupBatch]) -> float:
    """Fraction of groups whose own cluster has the highest ranking key."""
    model.eval()
    hits = []
    for batch in batches:
        log_post = torch.log_softmax(group_logits(model, batch), -1)
        keys = ranking_key(log_post, default_grade_gains(log_post.shape[-1]))
        hits.append(keys.argmax(1) == 0)
    return float(torch.cat(hits).float().mean())


def train_pair_listwise(
    model: PairNetwork,
    train: PrototypeSet,
    val: PrototypeSet,
    config: ListwiseConfig = DEFAULT_LISTWISE,
    progress: bool | None = None,
    train_front: bool = True,
    teacher: PairNetwork | None = None,
    distill: str = "margin",
) -> tuple[PairNetwork, PairTrainReport]:
    """Train `model` (a pair model with a retriever, already loaded with the stage-0 weights) on the
    retriever's candidate lists (`ListwiseConfig`); keep the weights with the best top-1 on validation groups,
    the starting weights and the retriever alone (the same weights with the scorer's head zero) included, so
    the result never ranks the validation groups worse than the retriever does.
    `train_front=False` trains the scorer only (a pruned variant: one item cache serves all). With a `teacher`
    (the dense model), the loss is distillation instead of labels: `margin` = MSE between the student's and the
    teacher's differences of ranking keys (each cluster minus the group's own, margin-MSE), `logits` = MSE of
    the aggregated logits (each centred over grades, as softmax ignores a shift)."""
    if model.retriever is None:
        raise ValueError("listwise training draws the retriever's candidate lists: the model needs a retriever")
    if train.num_grades != model.spec.num_grades or val.num_grades != model.spec.num_grades:
        raise ValueError(f"the sets are graded {train.num_grades}-way, the model {model.spec.num_grades}-way")
    if distill not in ("margin", "logits"):
        raise ValueError("distill must be 'margin' or 'logits'")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 61])
    retriever = model.retriever
    lists, val_lists = retriever_lists(train, retriever), retriever_lists(val, retriever)
    val_rng = np.random.default_rng([config.seed, 67])
    val_config = replace(config, group=config.top + 1)
    val_batches = [
        sample_groups(val_lists, retriever, min(64, config.val_queries), val_config, val_rng)
        for _ in range(max(1, config.val_queries // 64))
    ]
    # the retriever's copy is frozen (requires_grad False); the residual belongs to the front end
    params = [p for p in (model.parameters() if train_front else model.scorer.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    best = (group_top1(model, val_batches) if teacher is None else -1.0, 0, copy.deepcopy(model.state_dict()))
    if teacher is None and model.residual is not None:  # the retriever alone (scorer head zero) is a candidate
        alone = copy.deepcopy(model)
        with torch.no_grad():
            alone.scorer.head.weight.zero_()
            alone.scorer.head.bias.zero_()
        score = group_top1(alone, val_batches)
        if score > best[0]:
            best = (score, 0, copy.deepcopy(alone.state_dict()))
    grade_counts = np.zeros(model.spec.num_grades)
    start = time.perf_counter()
    show = config.progress if progress is None else progress
    for step in tqdm(range(1, config.steps + 1), desc="train pair model (listwise)", disable=not show, leave=False):
        model.train()
        if not train_front:
            model.trunk.eval()
            model.norm.eval()
        batch = sample_groups(lists, retriever, config.queries, config, rng)
        grade_counts += np.bincount(batch.grade.reshape(-1).numpy(), minlength=len(grade_counts))
        logits = group_logits(model, batch)
        if teacher is None:
            loss = listwise_loss(logits, batch.grade, config.pointwise)
        else:
            with torch.no_grad():
                teacher.eval()
                target = group_logits(teacher, batch)
            loss = distillation_loss(logits, target, distill)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        reapply_masks(model)
        if step % config.eval_every == 0 or step == config.steps:
            acc = group_top1(model, val_batches)
            if acc > best[0]:
                best = (acc, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    prior = tuple(float(p) for p in grade_counts / max(grade_counts.sum(), 1))
    return model, PairTrainReport(config.steps, best[1], best[0], prior, time.perf_counter() - start)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """`margin`: margin-MSE of ranking-key differences to each group's own cluster; `logits`: MSE of the
    aggregated logits, centred over grades. Both (B, G, grades)."""
    if kind == "logits":
        return F.mse_loss(student - student.mean(-1, keepdim=True), teacher - teacher.mean(-1, keepdim=True))
    gains = default_grade_gains(student.shape[-1]).to(student.dtype)
    ks = ranking_key(torch.log_softmax(student, -1), gains)
    kt = ranking_key(torch.log_softmax(teacher, -1), gains)
    return F.mse_loss(ks - ks[:, :1], kt - kt[:, :1])
