"""Training the bi-encoder (`models.biencoder`): contrastive (InfoNCE) on pairs of fresh views of one prototype.

Views of one prototype should embed close together and away from the other prototypes in the batch. On a user's
clusters the two views are two different stored members of one cluster. Build-time code: serving never imports it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.biencoder import BiEncoder, BiEncoderSpec, cluster_centroids, embed_numpy, spec_for
from models.prototypes import MemberPool, PrototypeSet, draw_view_pairs, make_views

__all__ = ["BiEncoderTrainConfig", "DEFAULT_BIENCODER_TRAINING", "train_biencoder"]


@dataclass(frozen=True)
class BiEncoderTrainConfig:
    steps: int = 1000
    batch_prototypes: int = 256
    temperature: float = 0.1
    lr: float = 3e-3
    eval_every: int = 250
    seed: int = 0
    progress: bool = False


DEFAULT_BIENCODER_TRAINING = BiEncoderTrainConfig()


def _val_recall(model: BiEncoder, val: PrototypeSet, rng: np.random.Generator, queries: int = 500) -> float:
    """Recall@1 of a fresh view's own prototype against the val set's centroids. With stored members, the
    query is a member and its own cluster's centroid is taken without it (leave one out)."""
    emb = embed_numpy(model, val.x)
    k = len(val.cluster_labels)
    if isinstance(val.prototypes, MemberPool):
        rows = rng.integers(0, len(val.x), size=queries)
        qid, eq = val.cluster[rows], emb[rows]
        sums = np.zeros((k, emb.shape[1]), dtype=np.float64)
        np.add.at(sums, val.cluster, emb)
        scores = eq @ (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).T
        rest = sums[qid] - eq
        scores[np.arange(queries), qid] = (eq * rest).sum(1) / np.maximum(np.linalg.norm(rest, axis=1), 1e-12)
        return float((scores.argmax(1) == qid).mean())
    cents = cluster_centroids(emb, val.cluster, k)
    qid = rng.integers(0, k, size=queries)
    eq = embed_numpy(model, make_views(val.prototypes, qid, rng))
    return float(((eq @ cents.T).argmax(1) == qid).mean())


def train_biencoder(
    train: PrototypeSet,
    val: PrototypeSet | None = None,
    config: BiEncoderTrainConfig = DEFAULT_BIENCODER_TRAINING,
    spec: BiEncoderSpec | None = None,
) -> BiEncoder:
    """InfoNCE (symmetric, in-batch negatives) on two fresh views of each of `batch_prototypes` training
    prototypes per step (all of them when there are fewer); with `val`, the weights with the best validation
    recall@1 are kept."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 21])
    model = BiEncoder(spec or spec_for(train.x.shape[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    k = len(train.cluster_labels)
    batch = min(config.batch_prototypes, k)
    best = (-1.0, copy.deepcopy(model.state_dict()))
    start = time.perf_counter()
    targets = torch.arange(batch)
    for step in tqdm(range(1, config.steps + 1), desc="train bi-encoder", disable=not config.progress, leave=False):
        model.train()
        ids = rng.choice(k, size=batch, replace=False)
        views_a, views_b = draw_view_pairs(train.prototypes, ids, ids, rng)
        a = model.embed(torch.from_numpy(views_a))
        b = model.embed(torch.from_numpy(views_b))
        logits = a @ b.T / config.temperature
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if val is not None and (step % config.eval_every == 0 or step == config.steps):
            r = _val_recall(model, val, np.random.default_rng([config.seed, 23]))
            if r > best[0]:
                best = (r, copy.deepcopy(model.state_dict()))
    if val is not None:
        model.load_state_dict(best[1])
    model.train_seconds = time.perf_counter() - start  # type: ignore[attr-defined]
    return model.eval()
