"""The Bayes-optimal ranking of a prototype space: the ceiling every scorer of queries by example is measured
against.

Given its prototype and its jitter, a view (`models.prototypes.make_views`) is an affine function of Gaussian
noise, so it is Gaussian:

    pre  = b_s + (1 - m_s) * (c F z1) + i z2 - shear * lin        (grid of length g = 72)
    view = (R pre - norm_mean) / norm_std                          (D = 40 samples)

where b_s is the prototype's padded, scaled template rolled by s = translation + jitter, m_s = (b_s != 0) the
template's support (fixed for given prototype and s), F the sigma-2 Gaussian filter (reflecting borders, as
`scipy.ndimage.gaussian_filter1d`), c and i the correlated and iid noise scales, lin = linspace(-0.5, 0.5, g),
and R the fixed linear resampling g -> D. Hence

    mean = (R (b_s - shear * lin) - norm_mean) / norm_std
    cov  = R (c^2 (1-m_s) F F^T (1-m_s) + i^2 I) R^T / norm_std^2.

The jitter is uniform on {-J..J} and queries pick prototypes uniformly, so the posterior over prototypes is the
softmax over k of log mean_j N(q; mean_kj, cov_kj). Sorting clusters by their expected gain under that
posterior (grade 2 own prototype, 1 same digit) maximises the expected DCG@k of every query, and the ideal DCG
does not depend on the answer, so it is the ranking of highest expected nDCG; recall@1 is maximised by the
posterior itself (MAP), which `CeilingScores.log_posterior` gives.

Only the generator's own model is used here: it is a yardstick, not a scorer a user's clusters could use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from models.prototypes import PrototypeConfig, Prototypes, make_prototypes

__all__ = [
    "CORR_SIGMA",
    "CeilingScores",
    "bayes_optimal",
    "expected_gains",
    "jitter_log_likelihoods",
    "log_likelihoods",
    "view_gaussians",
    "pair_space_config",
    "space_config_of",
    "ceiling_metrics",
    "measure",
]

CORR_SIGMA = 2.0
"""Width of the correlated noise's Gaussian filter in `make_views` (mnist1d's `corr_noise_like`)."""


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """mnist1d's `interpolate` (linear interpolation on [0, 1]) is linear in its input: one (n_out, n_in) map."""
    from mnist1d.transform import interpolate

    return np.asarray(interpolate(np.eye(n_in), n_out))


def _filter_matrix(n: int) -> np.ndarray:
    """F with F @ z = gaussian_filter1d(z, CORR_SIGMA) for a length-n row z (column i is the filtered e_i)."""
    return gaussian_filter1d(np.eye(n), CORR_SIGMA, axis=1).T


def view_gaussians(
    protos: Prototypes, ids: np.ndarray, jitters: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact distribution of a view of each prototype in `ids` at each jitter (default: all of -J..J).
    Returns (mean (n, S, D), cov (n, S, D, D)) in float64, S = len(jitters)."""
    c = protos.config
    g = c.grid_length
    ids = np.asarray(ids, dtype=np.int64)
    jit = np.arange(-c.jitter, c.jitter + 1) if jitters is None else np.asarray(jitters, dtype=np.int64)
    shift = protos.translation[ids, None] + jit[None, :]  # (n, S), as make_views: translation + jitter
    cols = (np.arange(g)[None, None, :] - shift[..., None]) % g  # np.roll by `shift`
    b = np.take_along_axis(np.broadcast_to(protos.base[ids, None, :], cols.shape), cols, axis=2)
    free = torch.from_numpy((b == 0).astype(np.float64))  # 1 - m_s: where the correlated noise lands
    lin = np.linspace(-0.5, 0.5, g)
    r = torch.from_numpy(_resample_matrix(g, c.final_seq_length))  # (D, g)
    pre_mean = torch.from_numpy(b - protos.shear[ids, None, None] * lin)
    mean = (pre_mean @ r.T - c.norm_mean) / c.norm_std
    corr = (r * free[..., None, :]) @ torch.from_numpy(c.corr_noise_scale * _filter_matrix(g))  # (n, S, D, g)
    cov = (corr @ corr.transpose(-1, -2) + c.iid_noise_scale**2 * (r @ r.T)) / c.norm_std**2
    return mean, cov


def jitter_log_likelihoods(protos: Prototypes, ids: np.ndarray, xq: np.ndarray) -> torch.Tensor:
    """log N(q; mean_kj, cov_kj) for every query q, prototype k in `ids` and jitter j: (Q, n, S) float64."""
    mean, cov = view_gaussians(protos, ids)
    chol = torch.linalg.cholesky(cov)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (n, S)
    q = torch.from_numpy(np.asarray(xq, dtype=np.float64))  # (Q, D)
    diff = q.T[None, None] - mean[..., None]  # (n, S, D, Q)
    white = torch.linalg.solve_triangular(chol, diff, upper=False)
    maha = (white**2).sum(-2)  # (n, S, Q)
    d = mean.shape[-1]
    return (-0.5 * (maha + logdet[..., None] + d * np.log(2 * np.pi))).permute(2, 0, 1)


def log_likelihoods(protos: Prototypes, xq: np.ndarray, chunk: int = 64) -> np.ndarray:
    """log p(q | prototype k) with the jitter marginalised (uniform on -J..J): (Q, K) float64. Streams the
    prototypes `chunk` at a time, so memory is O(chunk x S x Q x D), never O(K x D^2)."""
    s = 2 * protos.config.jitter + 1
    out = np.empty((len(xq), len(protos)))
    for start in range(0, len(protos), chunk):
        ids = np.arange(start, min(start + chunk, len(protos)))
        ll = jitter_log_likelihoods(protos, ids, xq)
        out[:, ids] = (torch.logsumexp(ll, dim=-1) - np.log(s)).numpy()
    return out


def expected_gains(
    log_posterior: np.ndarray, digit: np.ndarray, gains: tuple[float, ...] = (0.0, 1.0, 3.0)
) -> np.ndarray:
    """Expected gain of every cluster (Q, K) under a posterior over prototypes: gains[2] P(own prototype) +
    gains[1] P(same digit, another prototype) + gains[0] P(other digit)."""
    post = np.exp(log_posterior - log_posterior.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    digit = np.asarray(digit, dtype=np.int64)
    per_digit = np.zeros((len(post), int(digit.max()) + 1))
    for d in np.unique(digit):
        per_digit[:, d] = post[:, digit == d].sum(1)
    same = per_digit[:, digit]  # (Q, K): P(the query's digit is cluster k's)
    return gains[2] * post + gains[1] * (same - post) + gains[0] * (1 - same)


@dataclass(frozen=True)
class CeilingScores:
    """Per query and cluster: the log posterior over prototypes (rank by it for recall@1, the MAP answer) and
    the expected gain (rank by it for nDCG). Columns are prototype ids, i.e. the space's cluster rows."""

    log_posterior: np.ndarray  # (Q, K) float64, normalised over K
    expected_gain: np.ndarray  # (Q, K) float64
    digit: np.ndarray  # (K,) int64, each cluster's digit


def bayes_optimal(
    space_config: PrototypeConfig,
    queries: np.ndarray,
    gains: tuple[float, ...] = (0.0, 1.0, 3.0),
    role: str = "space",
    chunk: int = 64,
) -> CeilingScores:
    """Score every prototype of `make_prototype_set(space_config, role)` for every query (Q, D) by the exact
    likelihood of the generator's noise model, jitter marginalised, uniform prior over prototypes."""
    protos = make_prototypes(space_config, role)
    ll = log_likelihoods(protos, queries, chunk)
    log_post = ll - torch.logsumexp(torch.from_numpy(ll), dim=1, keepdim=True).numpy()
    return CeilingScores(log_post, expected_gains(log_post, protos.digit, gains), protos.digit.copy())


def pair_space_config() -> PrototypeConfig:
    """The prototype space the bootstrap builds for queries by example (its defaults)."""
    from cascade.bootstrap_config import PairConfig

    return PairConfig().space


def space_config_of(space_dir: Path) -> PrototypeConfig:
    """The generator's config of a prototype space on disk, from its meta (prototypes, views, seed, jitter) and
    the bootstrap's defaults for the rest; checked by rendering the items again: they must be the space's."""
    from cascade.space import Space
    from models.prototypes import make_prototype_set

    space = Space.load(space_dir)
    meta = space.meta
    if meta.get("dataset") != "mnist1d-prototypes":
        raise SystemExit(f"{space_dir} is not a prototype space (dataset {meta.get('dataset')!r}): it has no ceiling")
    config = replace(
        pair_space_config(),
        num_prototypes=int(meta["num_clusters"]),
        views=int(meta["cluster_size"]),
        seed=int(meta["seed"]),
        jitter=int(meta["jitter"]),
    )
    views = make_prototype_set(config, "space")
    if views.x.shape != space.features.shape or not np.array_equal(views.x, space.features):
        raise SystemExit(f"{space_dir}: the items are not those of {config}: the ceiling would score other prototypes")
    return config


def ceiling_metrics(
    scores: np.ndarray, cluster: np.ndarray, label: np.ndarray, cluster_labels: np.ndarray, k: int = 10
) -> dict[str, float]:
    """Mean recall@1, recall@k and graded nDCG@10 of rankings by `scores` (Q, K), per query as every other
    method of `cascade.evaluation` is scored."""
    from cascade.evaluation import graded_metrics
    from cascade.queries import cluster_grades, default_gains

    gains = np.asarray(default_gains(3))
    rows = []
    for i, s in enumerate(scores):
        ids = np.argsort(-s, kind="stable")[: max(k, 10)]
        grades = cluster_grades(cluster_labels, int(cluster[i]), int(label[i]), 3)
        rows.append(graded_metrics(ids, grades, gains, k))
    r1, rk, ndcg = np.mean(rows, axis=0)
    return {"recall@1": float(r1), f"recall@{k}": float(rk), "ndcg@10": float(ndcg)}


def measure(
    config: PrototypeConfig, xq: np.ndarray, cq: np.ndarray, yq: np.ndarray, k: int = 10, chunk: int = 64
) -> tuple[dict[str, dict[str, float]], CeilingScores]:
    """The ceiling's rows for queries (xq, their own clusters cq, their labels yq) of the space `config` renders:
    ranked by expected gain and by the MAP posterior. `benchmarks/bench_ceiling.py` prints them; other benchmarks
    call this for their ceiling row."""
    scores = bayes_optimal(config, xq, chunk=chunk)
    rows = {
        "ceiling (expected gain)": ceiling_metrics(scores.expected_gain, cq, yq, scores.digit, k),
        "ceiling (MAP posterior)": ceiling_metrics(scores.log_posterior, cq, yq, scores.digit, k),
    }
    return rows, scores
