"""Training pair models on prototype views: fresh (q view, x view, grade) pairs every step.

The grade mix of the training pairs is fixed (hard negatives included: grade 1 pairs are views of another
prototype of the same digit) and recorded as `grade_prior`, the pi that Bayes aggregation divides out
(research notes 1: log p(g | x_1..x_n) = sum_i log p(g | x_i) - (n - 1) log pi(g)).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from models.pair import PairNetwork, PairSpec
from models.prototypes import PrototypeSet, make_views

__all__ = [
    "PairBatch",
    "PairTrainConfig",
    "PairTrainReport",
    "DEFAULT_PAIR_TRAINING",
    "sample_pair_ids",
    "make_pairs",
    "pair_calibration",
    "pair_accuracy",
    "pair_logits",
    "train_pair_model",
]


@dataclass(frozen=True)
class PairBatch:
    """P pairs: query views q (P, D), item views x (P, D), grades (P,) int64."""

    q: torch.Tensor
    x: torch.Tensor
    grade: torch.Tensor

    def __len__(self) -> int:
        return len(self.grade)


@dataclass(frozen=True)
class PairTrainConfig:
    steps: int = 2500
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    grade_mix: tuple[float, float, float] = (0.2, 0.4, 0.4)
    """Fractions of grade 0, 1, 2 pairs in every batch; it is the grade prior of the trained model."""
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
    labels: np.ndarray, count: int, grade_mix: tuple[float, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prototype ids (query, item) and grades: 2 same prototype, 1 another prototype of the same digit,
    0 a prototype of another digit. `labels` is the digit of every prototype."""
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
        else:
            j = qid[i]
            while labels[j] == labels[qid[i]]:
                j = rng.integers(0, k)
            xid[i] = j
    return qid, xid, grade


def make_pairs(data: PrototypeSet, count: int, grade_mix: tuple[float, ...], rng: np.random.Generator) -> PairBatch:
    """`count` pairs of fresh views (never the set's stored items) of `data`'s prototypes."""
    qid, xid, grade = sample_pair_ids(data.cluster_labels, count, grade_mix, rng)
    q = make_views(data.prototypes, qid, rng)
    x = make_views(data.prototypes, xid, rng)
    return PairBatch(torch.from_numpy(q), torch.from_numpy(x), torch.from_numpy(grade))


def pair_calibration(
    train: PrototypeSet, size: int = 512, seed: int = 0, grade_mix: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
) -> PairBatch:
    """Pairs for pruning (the limited-data regime: a few hundred), drawn by seed from training prototypes."""
    return make_pairs(train, size, grade_mix, np.random.default_rng([seed, 7]))


@torch.no_grad()
def pair_logits(model: PairNetwork, pairs: PairBatch, batch_size: int = 4096) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model(pairs.q[i : i + batch_size], pairs.x[i : i + batch_size]) for i in range(0, len(pairs), batch_size)]
    )


def pair_accuracy(model: PairNetwork, pairs: PairBatch) -> float:
    """Fraction of pairs whose argmax grade is the true grade."""
    return float((pair_logits(model, pairs).argmax(1) == pairs.grade).float().mean())


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
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 11])
    model = model if model is not None else PairNetwork(spec)
    val_pairs = make_pairs(val, config.val_pairs, config.grade_mix, np.random.default_rng([config.seed, 13]))
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
        batch = make_pairs(train, config.batch_size, config.grade_mix, rng)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(batch.q, batch.x), batch.grade).backward()
        opt.step()
        sched.step()
        _reapply_masks(model)
        if step % config.eval_every == 0 or step == config.steps:
            acc = pair_accuracy(model, val_pairs)
            bar.set_postfix(val_acc=f"{acc:.3f}")
            if acc > best[0]:
                best = (acc, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    mix = np.asarray(config.grade_mix, dtype=np.float64)
    prior = tuple(float(p) for p in mix / mix.sum())
    return model, PairTrainReport(config.steps, best[1], best[0], prior, time.perf_counter() - start)


@torch.no_grad()
def _reapply_masks(model: nn.Module) -> None:
    """Masked (unstructured-pruned) weights stay zero through fine-tuning."""
    for module in model.modules():
        mask = getattr(module, "weight_mask", None)
        if isinstance(mask, torch.Tensor):
            module.weight.mul_(mask)
