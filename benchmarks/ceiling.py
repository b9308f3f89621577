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

from dataclasses import dataclass

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
