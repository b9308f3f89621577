"""Prototype spaces: views, queries, seed streams and grades that are constant on every cluster."""

from __future__ import annotations

import numpy as np
import pytest
from mnist1d.data import get_templates

from models.prototypes import (
    PrototypeConfig,
    grades,
    make_prototype_set,
    make_prototypes,
    make_queries,
    make_views,
)

SMALL = PrototypeConfig(num_prototypes=40, views=5, seed=3)


def test_set_shapes_grouping_and_balance() -> None:
    s = make_prototype_set(SMALL)
    assert s.x.shape == (200, 40) and s.x.dtype == np.float32
    assert s.y.dtype == np.int64 and s.cluster.dtype == np.int64
    np.testing.assert_array_equal(s.cluster, np.repeat(np.arange(40), 5))
    np.testing.assert_array_equal(s.y, s.cluster_labels[s.cluster])
    assert np.bincount(s.cluster_labels, minlength=10).tolist() == [4] * 10
    assert np.isfinite(s.x).all()


def test_same_config_same_set_other_seed_other_set() -> None:
    a, b = make_prototype_set(SMALL), make_prototype_set(SMALL)
    np.testing.assert_array_equal(a.x, b.x)
    c = make_prototype_set(PrototypeConfig(num_prototypes=40, views=5, seed=4))
    assert not np.allclose(a.x, c.x)


def test_rendering_ignores_global_numpy_state() -> None:
    np.random.seed(1)
    a = make_prototype_set(SMALL)
    np.random.seed(2)
    b = make_prototype_set(SMALL)
    np.testing.assert_array_equal(a.x, b.x)


def test_training_prototypes_come_from_another_stream() -> None:
    space, train = make_prototypes(SMALL, "space"), make_prototypes(SMALL, "train")
    params = ("padding", "scale", "shear", "translation")
    assert any(not np.array_equal(getattr(space, p), getattr(train, p)) for p in params)
    # continuous parameters: no training prototype coincides with a space prototype
    assert not set(np.round(space.scale, 12)) & set(np.round(train.scale, 12))
    with pytest.raises(ValueError, match="role"):
        make_prototypes(SMALL, "test")


def test_views_of_one_prototype_are_closer_than_other_prototypes_of_the_digit() -> None:
    """Without noise and jitter every view equals the prototype; with them, same-prototype views still sit
    closer on average than views of other prototypes of the same digit (the grade-2 signal exists)."""
    clean = PrototypeConfig(num_prototypes=20, views=3, jitter=0, corr_noise_scale=0, iid_noise_scale=0)
    s = make_prototype_set(clean)
    np.testing.assert_allclose(s.x[0::3], s.x[1::3], atol=1e-6)
    noisy = make_prototype_set(PrototypeConfig(num_prototypes=200, views=4, seed=5))
    x = noisy.x.astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    same_proto = noisy.cluster[:, None] == noisy.cluster[None, :]
    same_digit = (noisy.y[:, None] == noisy.y[None, :]) & ~same_proto
    off_diag = ~np.eye(len(x), dtype=bool)
    assert d[same_proto & off_diag].mean() < 0.7 * d[same_digit].mean()


def test_views_follow_the_template_and_the_jitter_bound() -> None:
    """A noise-free view is the mnist1d template, padded, dilated, scaled, shifted and sheared; jitter
    only shifts it by at most J grid steps."""
    cfg = PrototypeConfig(num_prototypes=10, views=1, jitter=2, corr_noise_scale=0, iid_noise_scale=0)
    protos = make_prototypes(cfg)
    rng = np.random.default_rng(0)
    v = make_views(protos, np.zeros(50, dtype=np.int64), rng)
    exact = make_views(
        protos.__class__(**{**protos.__dict__, "config": PrototypeConfig(**{**cfg.__dict__, "jitter": 0})}),
        np.zeros(1, dtype=np.int64),
        rng,
    )
    distinct = np.unique(np.round(v, 5), axis=0)
    assert 1 < len(distinct) <= 5  # 2J + 1 possible shifts
    assert any(np.allclose(row, exact[0], atol=1e-5) for row in v)
    template = get_templates()["x"][protos.digit[0]]
    assert protos.base.shape == (10, cfg.grid_length)
    assert np.isclose(np.abs(protos.base[0]).max(), np.abs(template).max() * protos.scale[0], rtol=0.05)


def test_queries_are_fresh_views_of_space_prototypes() -> None:
    s = make_prototype_set(SMALL)
    xq, cq, yq = make_queries(SMALL, 30, seed=1)
    assert xq.shape == (30, 40) and cq.shape == yq.shape == (30,)
    np.testing.assert_array_equal(yq, s.cluster_labels[cq])
    d = ((xq[:, None, :] - s.x[None, :, :]) ** 2).sum(-1)
    assert d.min() > 1e-6  # never one of the items
    xq2, cq2, _ = make_queries(SMALL, 30, seed=1)
    np.testing.assert_array_equal(xq, xq2)
    np.testing.assert_array_equal(cq, cq2)
    assert not np.array_equal(make_queries(SMALL, 30, seed=2)[0], xq)
    # a query's nearest item is most often a view of its own prototype
    nearest = s.cluster[d.argmin(1)]
    assert (nearest == cq).mean() > 0.5


def test_grades_are_constant_on_every_cluster() -> None:
    s = make_prototype_set(SMALL)
    _, cq, yq = make_queries(SMALL, 25, seed=0)
    cluster_ids = np.arange(len(s.cluster_labels))
    g = grades(cq, yq, cluster_ids, s.cluster_labels)
    assert g.shape == (25, 40)
    # per item, then check every item of a cluster has its cluster's grade
    per_item = grades(cq, yq, s.cluster, s.y)
    np.testing.assert_array_equal(per_item, g[:, s.cluster])
    assert (g == 2).sum(1).tolist() == [1] * 25
    assert ((g >= 1).sum(1) == 4).all()  # 4 prototypes per digit in SMALL
    assert grades(cq[0], yq[0], cluster_ids, s.cluster_labels).shape == (40,)
    assert grades(5, 5, np.array([5, 6, 7]), np.array([5, 5, 1])).tolist() == [2, 1, 0]


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="jitter"):
        PrototypeConfig(jitter=40)
    with pytest.raises(ValueError, match="positive"):
        PrototypeConfig(views=0)
    with pytest.raises(ValueError, match="count"):
        make_queries(SMALL, -1)
