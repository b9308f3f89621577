"""Pruning pair models: the scorer (an ordinary `Classifier`) is pruned by any of the registered methods on
calibration pairs, seen through the interaction features z = interaction(q, x) with their grades as labels.
The trunk and normalisation are kept as they are, so the dense model's cached item features serve every
pruned variant."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from models.manifest import Manifest
from models.pair import PairNetwork
from models.pair_calibration import calibrate_pair
from models.pair_training import (
    DEFAULT_PAIR_TRAINING,
    ListwiseConfig,
    PairBatch,
    PairTrainConfig,
    make_pairs,
    pair_accuracy,
    pair_calibration,
    pair_logits,
    train_pair_listwise,
    train_pair_model,
)
from models.prototypes import PrototypeSet
from models.pruning.api import prune
from models.pruning.budgets import BudgetRule
from models.pruning.masks import Scope
from models.pruning.registry import Calibration, get_method
from models.registry import ModelRegistry

__all__ = ["prune_pair", "pair_output_deviation", "prune_pair_and_register", "probe_pairs"]


_INHERITED = ("grade_prior", "prototypes", "gains")
"""Manifest `extra` keys a pruned variant carries over from its dense parent."""


@torch.no_grad()
def _calibration(model: PairNetwork, pairs: PairBatch) -> Calibration:
    model.eval()
    return Calibration(x=model.interaction(pairs.q, pairs.x).detach(), y=pairs.grade)


def prune_pair(
    model: PairNetwork,
    method: str,
    keep: float,
    calibration_pairs: PairBatch | None = None,
    *,
    scope: Scope = "global",
    reweight: bool = False,
    budget: BudgetRule = "uniform",
) -> PairNetwork:
    """A new pair model whose scorer is `prune(model.scorer, method, keep, Calibration(z, grades))`.
    The input model is untouched; the front end (trunk, normalisation) is copied."""
    calibration = _calibration(model, calibration_pairs) if calibration_pairs is not None else None
    scorer = prune(model.scorer, method, keep, calibration, scope=scope, reweight=reweight, budget=budget)
    return model.with_scorer(scorer).eval()


def pair_output_deviation(model: PairNetwork, reference: PairNetwork, pairs: PairBatch) -> tuple[float, float]:
    """Mean and 95th percentile of ||f(q, x) - f_pruned(q, x)|| / ||f(q, x)|| over probe pairs."""
    ref, out = pair_logits(reference, pairs), pair_logits(model, pairs)
    rel = (out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)
    return float(rel.mean()), float(torch.quantile(rel, 0.95))


def probe_pairs(val: PrototypeSet, size: int = 3000, seed: int = 0) -> PairBatch:
    """Fixed probe pairs of validation prototypes, balanced over grades (accuracy and deviation)."""
    return make_pairs(val, size, (1 / 3, 1 / 3, 1 / 3), np.random.default_rng([seed, 31]))


def prune_pair_and_register(
    registry: ModelRegistry,
    parent: str,
    method: str,
    keep: float,
    new_name: str,
    train: PrototypeSet,
    val: PrototypeSet,
    *,
    scope: Scope = "global",
    reweight: bool = False,
    budget: BudgetRule = "uniform",
    finetune_steps: int = 0,
    finetune: PairTrainConfig = DEFAULT_PAIR_TRAINING,
    listwise: ListwiseConfig | None = None,
    distill: str | None = "margin",
    calibration_size: int = 512,
    seed: int = 0,
    activate: bool = True,
    progress: bool = False,
    extra: dict[str, object] | None = None,
) -> Manifest:
    """Prune a registered pair model (`name` or `name:version`), optionally fine-tune the scorer only for
    `finetune_steps` steps (front end frozen), and register it with its accuracy on balanced probe pairs and
    its output deviation from the parent. The parent's grade prior is carried over into `extra`.

    A parent with a retriever (`PairSpec.retriever`) is fine-tuned on the retriever's candidate lists
    (`train_pair_listwise`, `listwise` or its defaults): distilled from the parent's outputs (`distill`:
    `margin`, margin-MSE of ranking-key differences, or `logits`), or with `distill=None` on the labels like the
    parent. Other parents: pointwise on pairs (`finetune`)."""
    name, _, version = parent.partition(":")
    dense = registry.load(name, int(version) if version else None)
    if not isinstance(dense.model, PairNetwork):
        raise ValueError(f"{dense.manifest.ref} is not a pair model")
    needs_calibration = get_method(method).needs_data or reweight or budget != "uniform"
    pairs = pair_calibration(train, calibration_size, seed) if needs_calibration else None
    torch.manual_seed(seed)
    pruned = prune_pair(dense.model, method, keep, pairs, scope=scope, reweight=reweight, budget=budget)
    prior = dense.manifest.extra.get("grade_prior")
    how = "none"
    if finetune_steps > 0 and pruned.retriever is not None:
        config = replace(listwise or ListwiseConfig(), steps=finetune_steps, seed=seed, progress=progress)
        teacher = dense.model if distill is not None else None
        pruned, _ = train_pair_listwise(
            pruned, train, val, config, train_front=False, teacher=teacher, distill=distill or "margin"
        )
        how = f"distilled ({distill})" if distill is not None else "listwise on labels"
    elif finetune_steps > 0:
        mix = tuple(prior) if prior else finetune.grade_mix
        config = replace(finetune, steps=finetune_steps, seed=seed, grade_mix=mix, progress=progress)
        pruned, _ = train_pair_model(pruned.spec, train, val, config, model=pruned, train_front=False)
        how = "pointwise on labels"
    probes = probe_pairs(val, seed=seed)
    calibration = calibrate_pair(pruned, val, seed=seed) if pruned.retriever is not None else None
    return registry.register(
        new_name,
        pruned,
        accuracy=pair_accuracy(pruned, probes),
        parent=dense.manifest.ref,
        method=method,
        keep=keep,
        dataset=dense.manifest.dataset,
        output_deviation=pair_output_deviation(pruned, dense.model, probes),
        extra={
            **{k: v for k, v in dense.manifest.extra.items() if k in _INHERITED},
            **(extra or {}),
            "scope": scope,
            "reweight": reweight,
            "budget": budget,
            "finetune_steps": finetune_steps,
            "finetune": how,
            "calibration_size": calibration_size if pairs is not None else 0,
            "posterior_calibration": calibration,
            "seed": seed,
        },
        activate=activate,
    )
