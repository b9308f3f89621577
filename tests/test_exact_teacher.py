"""The lab's teacher is the ceiling's posterior restricted to a group: its cached factors give the same numbers as
the ceiling's own likelihood, and its soft cross-entropy is the hard one when the target is one-hot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lab.ceiling import log_likelihoods
from lab.exact_teacher import ExactTeacher, soft_cross_entropy
from models.prototypes import PrototypeConfig, make_prototypes, make_queries

TINY = PrototypeConfig(num_prototypes=30, views=2, seed=5)


def test_the_group_posterior_is_the_ceilings_renormalised_over_the_group() -> None:
    protos = make_prototypes(TINY)
    xq, cq, _ = make_queries(TINY, 6, seed=4)
    groups = np.stack([np.r_[c, (c + 1 + np.arange(4) * 5) % TINY.num_prototypes] for c in cq])  # own first
    teacher = ExactTeacher(protos, chunk=7)
    got = teacher.log_posterior(torch.from_numpy(xq), groups).double()
    ll = np.take_along_axis(log_likelihoods(protos, xq), groups, 1)
    want = torch.log_softmax(torch.from_numpy(ll), 1)
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    # the exact posterior knows its queries: each view's own prototype is its group's most likely
    assert (got.argmax(1) == 0).float().mean() >= 5 / 6
    # a temperature above 1 softens it without reordering
    soft = teacher.log_posterior(torch.from_numpy(xq), groups, temperature=4.0)
    assert torch.equal(soft.argsort(1), got.float().argsort(1))
    assert (soft.exp().max(1).values <= got.exp().max(1).values + 1e-6).all()


def test_soft_cross_entropy_of_a_one_hot_target_is_the_hard_one() -> None:
    keys = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    one_hot = torch.full((5, 7), -1e9)
    one_hot[:, 0] = 0.0
    assert soft_cross_entropy(keys, torch.log_softmax(one_hot, 1)).item() == pytest.approx(
        F.cross_entropy(keys, torch.zeros(5, dtype=torch.long)).item(), rel=1e-6
    )
