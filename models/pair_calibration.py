"""Calibrating a pair model's cluster posteriors where they are served: on the retriever's own candidate lists of
validation clusters (the query's own cluster and the retriever's `CANDIDATES - 1` nearest others, as many as the
default cascade's last stage reads, each through `members` members averaged as the stages average them), one
temperature fitted on half of the queries and the expected calibration error reported on the other half."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from models.calibration import calibration_report, fit_temperature
from models.pair import PairNetwork
from models.pair_training import DEFAULT_LISTWISE, group_logits, retriever_lists, sample_groups
from models.prototypes import PrototypeSet

__all__ = ["calibrate_pair", "CALIBRATION_MEMBERS", "CANDIDATES"]

CALIBRATION_MEMBERS = 10
"""Members read per cluster: the default cascade's last stage reads 10 (its posteriors are the ones answered)."""
CANDIDATES = 20
"""Clusters per query: the default cascade's last stage reads the 20 its previous stage kept."""


@torch.no_grad()
def calibrate_pair(
    model: PairNetwork, val: PrototypeSet, queries: int = 128, members: int = CALIBRATION_MEMBERS, seed: int = 0
) -> dict[str, float] | None:
    """The model's temperature and its calibration report (`models.calibration.calibration_report`, ECE and NLL on
    the held-out half), or None for a model without a retriever (no candidate lists to draw)."""
    if model.retriever is None:
        return None
    model.eval()
    lists = retriever_lists(val, model.retriever)
    config = replace(DEFAULT_LISTWISE, group=CANDIDATES, top=CANDIDATES - 1, members=members)
    rng = np.random.default_rng([seed, 71])
    logits, grades = [], []
    for _ in range(max(2, queries // 64)):
        batch = sample_groups(lists, model.retriever, 64, config, rng)
        logits.append(group_logits(model, batch).reshape(-1, model.spec.num_grades))
        grades.append(batch.grade.reshape(-1))
    half = len(logits) // 2  # fitted on the first half of the queries, reported on the rest
    fit_logits, fit_grades = torch.cat(logits[:half]), torch.cat(grades[:half])
    temperature = fit_temperature(fit_logits, fit_grades)
    report = calibration_report(torch.cat(logits[half:]), torch.cat(grades[half:]), temperature)
    return {**report, "members": members, "fitted_on_pairs": len(fit_grades)}
