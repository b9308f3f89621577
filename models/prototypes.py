"""MNIST-1D prototypes and their views: ground truth that is constant on every cluster.

A *prototype* is a digit template with fixed padding, scale, shear and translation (the parameters that
`mnist1d.transform.transform` draws per sample). A *view* renders the prototype with its translation plus a
small jitter (|jitter| <= J) and fresh correlated and iid noise. A cluster is the m views of one prototype;
a query is a fresh view of a prototype, never one of the items. Grades (project definition): 2 = same
prototype, 1 = same digit, 0 = other.

The pieces are mnist1d's own (templates, `interpolate`, the sigma-2 Gaussian filter of `corr_noise_like`),
rearranged so that every random number comes from a `np.random.Generator` (mnist1d draws from the global
numpy state) and so that rendering is vectorised: padding, dilation and scale are fixed per prototype, the
final resampling is one fixed linear map. `get_dataset` is never called (it downloads).

A user's own data has no renderer: `MemberPool` stands in for `Prototypes` there. A "view" of cluster c is
then one of c's stored members drawn at random (`member_set`), and the two sides of a same-cluster pair are
always two different members, so "identical vectors" is never what grade 2 means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

__all__ = [
    "PrototypeConfig",
    "Prototypes",
    "MemberPool",
    "PrototypeSet",
    "member_set",
    "draw_view_pairs",
    "DEFAULT_PROTOTYPES",
    "ROLES",
    "make_prototypes",
    "make_views",
    "make_prototype_set",
    "views_rng",
    "make_queries",
    "grades",
    "normalise",
    "similar_prototypes",
]

ROLES = {"space": 0, "train": 1, "val": 2}
"""Independent seed streams: pair-model and bi-encoder training prototypes never are the space's."""

_VIEW_STREAM = 10  # spawn keys >= this are view/noise streams, below it prototype parameter streams
_QUERY_STREAM = 20


@dataclass(frozen=True)
class PrototypeConfig:
    """Defaults of mnist1d's `get_dataset_args` except the view parameters (jitter, noise) and the counts.

    `jitter` is in units of mnist1d's translation grid (72 samples before resampling to 40). `norm_mean` and
    `norm_std` are the one fixed affine normalisation applied to every view (items and queries alike); they
    were measured once on the 20,000 default space views (`python -m models.prototypes`; they match
    mnist1d's own dataset statistics, mean -0.0062, std 0.154) and are stored, not recomputed.
    """

    num_prototypes: int = 2000
    views: int = 10
    jitter: int = 3
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 0.02
    seed: int = 0
    template_len: int = 12
    padding: tuple[int, int] = (36, 60)
    scale_coeff: float = 0.4
    max_translation: int = 48
    shear_scale: float = 0.75
    final_seq_length: int = 40
    norm_mean: float = -0.0062
    norm_std: float = 0.1555

    def __post_init__(self) -> None:
        if self.num_prototypes < 1 or self.views < 1:
            raise ValueError("num_prototypes and views must be positive")
        if not 0 <= self.jitter < self.grid_length // 2:
            raise ValueError(f"jitter must be in [0, {self.grid_length // 2})")
        if self.corr_noise_scale < 0 or self.iid_noise_scale < 0 or self.norm_std <= 0:
            raise ValueError("noise scales must be >= 0 and norm_std > 0")
        if not 0 <= self.padding[0] <= self.padding[1] or self.max_translation < 1:
            raise ValueError("padding must be an ordered pair of non-negative ints; max_translation >= 1")

    @property
    def grid_length(self) -> int:
        """Length before the final resampling (template + the largest padding), as in mnist1d."""
        return self.template_len + self.padding[1]


DEFAULT_PROTOTYPES = PrototypeConfig()


@dataclass(frozen=True)
class Prototypes:
    """K prototypes: their parameters and the padded, dilated, scaled template (before translation)."""

    config: PrototypeConfig
    digit: np.ndarray  # (K,) int64
    padding: np.ndarray  # (K,) int64
    scale: np.ndarray  # (K,) float64, the multiplicative factor
    shear: np.ndarray  # (K,) float64, the shear coefficient
    translation: np.ndarray  # (K,) int64 in [0, max_translation)
    base: np.ndarray = field(repr=False)  # (K, grid_length) float64

    def __len__(self) -> int:
        return len(self.digit)


@dataclass(frozen=True)
class MemberPool:
    """A user's clusters as the source of views: the stored members of cluster c are rows
    `offsets[c] .. offsets[c+1]-1` of `x`, and `digit` is each cluster's label (named as `Prototypes` names it,
    so every sampler of pairs reads both alike)."""

    x: np.ndarray  # (N, D) float32, grouped by cluster
    offsets: np.ndarray  # (K + 1,) int64
    digit: np.ndarray  # (K,) int64, the label of every cluster

    def __len__(self) -> int:
        return len(self.digit)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def draw_rows(self, ids: np.ndarray, rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
        """One uniformly drawn member row of each cluster in `ids`; where `avoid` (a row per entry) is a member
        of that same cluster and the cluster has another member, that row is never drawn."""
        ids = np.asarray(ids, dtype=np.int64)
        start, size = self.offsets[ids], self.sizes[ids]
        if avoid is None:
            return start + (rng.random(len(ids)) * size).astype(np.int64)
        avoid = np.asarray(avoid, dtype=np.int64)
        skip = (avoid >= start) & (avoid < start + size) & (size > 1)
        rows = start + (rng.random(len(ids)) * (size - skip)).astype(np.int64)
        return rows + (skip & (rows >= avoid))


@dataclass(frozen=True)
class PrototypeSet:
    """N views grouped by prototype (K x m of them for rendered prototypes: rows `c*m .. c*m+m-1` are the
    views of prototype c; for a `MemberPool`, the stored members of each cluster)."""

    x: np.ndarray  # (N, D) float32, normalised
    y: np.ndarray  # (N,) int64 digit
    cluster: np.ndarray  # (N,) int64 prototype id
    prototypes: Prototypes | MemberPool = field(repr=False)
    num_grades: int = 3
    """Grades pairs of this set are labelled with: 3 (other, same label, same cluster) or 2 when the clusters
    carry no instance structure (other, same label: the own cluster is then just a cluster of its label)."""

    def __len__(self) -> int:
        return len(self.y)

    @property
    def cluster_labels(self) -> np.ndarray:
        """The digit of every prototype (cluster), indexed by prototype id."""
        return self.prototypes.digit


def _rng(config: PrototypeConfig, role: str, stream: int, extra: int = 0) -> np.random.Generator:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {sorted(ROLES)}")
    return np.random.default_rng(np.random.SeedSequence([config.seed, ROLES[role], stream, extra]))


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """mnist1d's `interpolate` is linear in its input, so n_in -> n_out resampling is one (n_out, n_in) map."""
    from mnist1d.transform import interpolate

    return np.asarray(interpolate(np.eye(n_in), n_out))


def make_prototypes(config: PrototypeConfig, role: str = "space") -> Prototypes:
    """Draw K prototypes with balanced digits; the same config and role always give the same prototypes."""
    from mnist1d.data import get_templates
    from mnist1d.transform import interpolate

    rng = _rng(config, role, 0)
    k = config.num_prototypes
    templates = get_templates()["x"]
    digit = rng.permutation(np.arange(k) % len(templates)).astype(np.int64)
    low, high = config.padding
    padding = rng.integers(low, high + 1, size=k).astype(np.int64)
    scale = 1 + config.scale_coeff * (rng.random(k) - 0.5)
    shear = config.shear_scale * (rng.random(k) - 0.5)
    translation = rng.integers(0, config.max_translation, size=k).astype(np.int64)
    base = np.empty((k, config.grid_length))
    for i in range(k):  # once per prototype; views are vectorised
        padded = np.concatenate([templates[digit[i]] + 1e-8, np.zeros(padding[i])])
        base[i] = interpolate(padded, config.grid_length) * scale[i]
    return Prototypes(config, digit, padding, scale, shear, translation, base)


def make_views(protos: Prototypes | MemberPool, prototype_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render one view per entry of `prototype_ids`: translation + jitter, fresh correlated and iid noise,
    the prototype's shear, resampling to 40 and the fixed normalisation. Returns (len(ids), 40) float32.
    For a `MemberPool`: one stored member of each cluster, drawn at random."""
    if isinstance(protos, MemberPool):
        return protos.x[protos.draw_rows(prototype_ids, rng)]
    c = protos.config
    ids = np.asarray(prototype_ids, dtype=np.int64)
    n, g = len(ids), c.grid_length
    jitter = rng.integers(-c.jitter, c.jitter + 1, size=n)
    shift = protos.translation[ids] + jitter
    # np.roll by `shift` per row: mnist1d's translate is a circular shift to the right
    cols = (np.arange(g)[None, :] - shift[:, None]) % g
    x = np.take_along_axis(protos.base[ids], cols, axis=1)
    mask = x != 0
    corr = gaussian_filter1d(c.corr_noise_scale * rng.standard_normal((n, g)), 2, axis=1)
    x = np.where(mask, x, corr)
    x = x + c.iid_noise_scale * rng.standard_normal((n, g))
    x = x - protos.shear[ids, None] * np.linspace(-0.5, 0.5, g)[None, :]
    x = x @ _resample_matrix(g, c.final_seq_length).T
    return normalise(x, c)


def draw_view_pairs(
    protos: Prototypes | MemberPool, qid: np.ndarray, xid: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Views of clusters `qid` and `xid`, pairwise. Rendered prototypes: two independent renderings. Stored
    members: where qid == xid the two are different members (clusters of one member excepted)."""
    if isinstance(protos, MemberPool):
        qrow = protos.draw_rows(qid, rng)
        return protos.x[qrow], protos.x[protos.draw_rows(xid, rng, avoid=qrow)]
    return make_views(protos, qid, rng), make_views(protos, xid, rng)


def member_set(x: np.ndarray, y: np.ndarray, cluster: np.ndarray, min_size: int = 2) -> PrototypeSet:
    """A user's items as a `PrototypeSet`: clusters with at least `min_size` members (a same-cluster pair needs
    two), renumbered 0..K-1 in the order of their ids, each labelled by its majority label; views are its stored
    members. Raises ValueError when no cluster is left."""
    x, y, cluster = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64), np.asarray(cluster)
    ids, inverse, sizes = np.unique(cluster, return_inverse=True, return_counts=True)
    kept = np.flatnonzero(sizes >= min_size)
    if len(kept) == 0:
        raise ValueError(f"no cluster has {min_size} or more members, so no same-cluster pair can be drawn")
    new_id = np.full(len(ids), -1, dtype=np.int64)
    new_id[kept] = np.arange(len(kept))
    c = new_id[inverse]
    rows = np.flatnonzero(c >= 0)
    rows = rows[np.argsort(c[rows], kind="stable")]
    c = c[rows]
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(c, minlength=len(kept)))
    votes = np.zeros((len(kept), int(y.max()) + 1), dtype=np.int64)
    np.add.at(votes, (c, y[rows]), 1)
    pool = MemberPool(x=x[rows], offsets=offsets, digit=votes.argmax(1).astype(np.int64))
    return PrototypeSet(x=pool.x, y=y[rows], cluster=c, prototypes=pool)


def normalise(x: np.ndarray, config: PrototypeConfig) -> np.ndarray:
    """The one fixed affine normalisation (constants in the config), so queries and items agree."""
    return ((x - config.norm_mean) / config.norm_std).astype(np.float32)


def views_rng(config: PrototypeConfig, role: str = "space") -> np.random.Generator:
    """A fresh copy of the random stream `make_prototype_set` renders its views from (its first draws are the
    views' jitters): a study that needs the true jitters replays it."""
    return _rng(config, role, _VIEW_STREAM)


def make_prototype_set(config: PrototypeConfig = DEFAULT_PROTOTYPES, role: str = "space") -> PrototypeSet:
    """K prototypes x m views. `role` selects an independent seed stream (`space`, `train`, `val`)."""
    protos = make_prototypes(config, role)
    ids = np.repeat(np.arange(len(protos)), config.views)
    x = make_views(protos, ids, views_rng(config, role))
    return PrototypeSet(x=x, y=protos.digit[ids].copy(), cluster=ids, prototypes=protos)


def make_queries(
    config: PrototypeConfig, count: int, seed: int = 0, role: str = "space"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` fresh views of prototypes of the set `make_prototype_set(config, role)` builds, drawn
    uniformly with replacement. Their noise comes from a stream the items never use, so a query is never an
    item. Returns (xq (count, 40) float32, cluster_q (count,) int64, yq (count,) int64)."""
    if count < 0:
        raise ValueError("count must be >= 0")
    protos = make_prototypes(config, role)
    rng = _rng(config, role, _QUERY_STREAM, seed)
    cluster_q = rng.integers(0, len(protos), size=count).astype(np.int64)
    xq = make_views(protos, cluster_q, rng)
    return xq, cluster_q, protos.digit[cluster_q].copy()


def similar_prototypes(protos: Prototypes | MemberPool, count: int = 10) -> np.ndarray:
    """(K, count) ids of the most similar *other* prototypes of the same digit (L2 between noise-free,
    jitter-free renderings; for stored members, between cluster means): the hard negatives of pair training
    (grade 1 pairs that look alike)."""
    if isinstance(protos, MemberPool):
        sums = np.add.reduceat(protos.x.astype(np.float64), protos.offsets[:-1], axis=0)
        x = sums / protos.sizes[:, None]
    else:
        c = protos.config
        clean = PrototypeConfig(**{**c.__dict__, "jitter": 0, "corr_noise_scale": 0.0, "iid_noise_scale": 0.0})
        clean_protos = Prototypes(**{**protos.__dict__, "config": clean})
        x = make_views(clean_protos, np.arange(len(protos)), _rng(c, "space", 99)).astype(np.float64)
    out = np.zeros((len(protos), count), dtype=np.int64)
    for digit in np.unique(protos.digit):
        ids = np.flatnonzero(protos.digit == digit)
        if isinstance(protos, MemberPool):  # a user's label may own thousands of clusters: no K x K x D array
            sq = (x[ids] ** 2).sum(1)
            d = sq[:, None] + sq[None, :] - 2 * x[ids] @ x[ids].T
        else:
            d = ((x[ids, None, :] - x[None, ids, :]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        k = min(count, len(ids) - 1)
        if k < 1:
            out[ids] = ids[:, None]
            continue
        nearest = ids[np.argsort(d, axis=1)[:, :k]]
        out[ids] = nearest[:, np.arange(count) % k]
    return out


def grades(
    query_cluster: np.ndarray | int,
    query_label: np.ndarray | int,
    cluster_ids: np.ndarray,
    cluster_labels: np.ndarray,
) -> np.ndarray:
    """Relevance grade of every cluster for every query: 2 same prototype, 1 same digit, 0 other.
    Scalar query -> (K,); queries of shape (Q,) -> (Q, K). Constant on each cluster by construction."""
    qc, ql = np.asarray(query_cluster), np.asarray(query_label)
    cid, clab = np.asarray(cluster_ids), np.asarray(cluster_labels)
    if qc.ndim == 1:
        qc, ql = qc[:, None], ql[:, None]
    same_label = (ql == clab).astype(np.int64)
    return np.where(qc == cid, 2, same_label).astype(np.int64)


if __name__ == "__main__":  # measures the normalisation constants stored in PrototypeConfig
    raw = PrototypeConfig(norm_mean=0.0, norm_std=1.0)
    views = make_prototype_set(raw).x.astype(np.float64)
    print(f"norm_mean={views.mean():.4f} norm_std={views.std():.4f}")
