"""The ceiling's noise model is the generator's: the Gaussian of a prototype at one jitter has the mean and
covariance of many views rendered by `make_views`, its log-likelihood is that Gaussian's density, and it
picks a view's own prototype on a tiny space. The benchmark scores a space's shipped queries and refuses a
space whose items its config does not render."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from cascade.bootstrap_config import PairConfig
from lab.ceiling import bayes_optimal, expected_gains, jitter_log_likelihoods, view_gaussians
from models.prototypes import PrototypeConfig, make_prototype_set, make_prototypes, make_queries, make_views

TINY = PrototypeConfig(num_prototypes=30, views=2, seed=5)


@pytest.mark.parametrize(("prototype", "jitter"), [(0, -3), (7, 0), (11, 3)])
def test_gaussian_matches_the_moments_of_rendered_views(prototype: int, jitter: int) -> None:
    protos = make_prototypes(TINY)
    # the same prototype with its translation moved by `jitter` and no jitter left: every view at that jitter
    fixed = replace(protos, translation=protos.translation + jitter, config=replace(TINY, jitter=0))
    n = 20_000
    views = make_views(fixed, np.full(n, prototype), np.random.default_rng(17)).astype(np.float64)
    mean, cov = (t.numpy()[0, 0] for t in view_gaussians(protos, np.array([prototype]), np.array([jitter])))

    var = np.diag(cov)
    mean_z = (views.mean(0) - mean) / np.sqrt(var / n)  # standard errors of the empirical mean
    assert np.abs(mean_z).max() < 5, np.abs(mean_z).max()
    emp_cov = np.cov(views, rowvar=False)
    cov_se = np.sqrt((np.outer(var, var) + cov**2) / n)  # of a Gaussian's empirical covariance
    cov_z = (emp_cov - cov) / cov_se
    assert np.abs(cov_z).max() < 6, np.abs(cov_z).max()
    # the template's support carries no correlated noise: the variance is far from uniform along the view
    assert var.max() > 5 * var.min()


def test_log_likelihood_is_the_gaussian_density() -> None:
    protos = make_prototypes(TINY)
    xq, _, _ = make_queries(TINY, 3, seed=2)
    ids = np.array([4, 9])
    ll = jitter_log_likelihoods(protos, ids, xq).numpy()  # (Q, n, S)
    mean, cov = (t.numpy() for t in view_gaussians(protos, ids))
    for q in range(len(xq)):
        for i in range(len(ids)):
            for s in range(mean.shape[1]):
                want = multivariate_normal(mean[i, s], cov[i, s]).logpdf(xq[q].astype(np.float64))
                assert ll[q, i, s] == pytest.approx(want, rel=1e-9, abs=1e-6)


def test_views_are_most_likely_under_their_own_prototype() -> None:
    torch.set_num_threads(1)
    xq, cq, yq = make_queries(TINY, 60, seed=3)
    scores = bayes_optimal(TINY, xq, chunk=7)
    assert scores.log_posterior.shape == (60, TINY.num_prototypes)
    np.testing.assert_allclose(np.exp(scores.log_posterior).sum(1), 1.0)
    assert (scores.log_posterior.argmax(1) == cq).mean() >= 0.9
    assert (scores.digit[scores.expected_gain.argmax(1)] == yq).mean() >= 0.9


def test_expected_gain_weighs_the_own_prototype_and_its_digit() -> None:
    log_post = np.log(np.array([[0.5, 0.3, 0.2]]))
    got = expected_gains(log_post, np.array([0, 0, 1]), (0.0, 1.0, 3.0))
    # cluster 0: 3 x 0.5 + 1 x (0.8 - 0.5); cluster 1: 3 x 0.3 + 1 x 0.5; cluster 2: 3 x 0.2
    np.testing.assert_allclose(got, [[1.8, 1.4, 0.6]])


def _tiny_space_dir(root: Path, config: PrototypeConfig, meta_seed: int) -> Path:
    """A prototype space on disk as the bootstrap writes it (items, meta, shipped queries), with `meta_seed`
    recorded as its seed."""
    from cascade.queries import QuerySet
    from cascade.space import build_space

    views = make_prototype_set(config)
    meta = {"dataset": "mnist1d-prototypes", "cluster_size": config.views, "jitter": config.jitter, "seed": meta_seed}
    space_dir = root / "spaces" / "tiny"
    build_space(views.x, views.y, np.full(10, 0.1), views.cluster, meta).save(space_dir)
    xq, cq, yq = make_queries(config, 40, seed=1)
    QuerySet(x=xq, cluster=cq, label=yq).save(space_dir)
    return space_dir


def test_the_ceiling_scores_the_shipped_queries_of_a_space(tmp_path: Path) -> None:
    from cascade.queries import QuerySet
    from lab.ceiling import measure, space_config_of

    config = replace(PairConfig().space, num_prototypes=30, views=3, seed=5)
    space_dir = _tiny_space_dir(tmp_path, config, meta_seed=5)
    assert space_config_of(space_dir) == config  # read back from the space's meta, checked against its items
    shipped = QuerySet.load(space_dir)
    xq, cq, yq = make_queries(config, 40, seed=1)
    rows, _ = measure(config, shipped.x[:25], shipped.cluster[:25], shipped.label[:25])
    assert rows == measure(config, xq[:25], cq[:25], yq[:25])[0]
    assert rows["ceiling (expected gain)"]["recall@1"] >= 0.9
    assert rows["ceiling (expected gain)"]["ndcg@10"] >= rows["ceiling (MAP posterior)"]["ndcg@10"]


def test_the_ceiling_refuses_a_space_its_config_does_not_render(tmp_path: Path) -> None:
    from lab.ceiling import space_config_of

    config = replace(PairConfig().space, num_prototypes=30, views=3, seed=5)
    space_dir = _tiny_space_dir(tmp_path, config, meta_seed=6)  # the meta names another seed than its items'
    with pytest.raises(SystemExit, match="not those of"):
        space_config_of(space_dir)
