"""Datasets with fixed splits. The pool split is never trained on: the built-in data's space is drawn from it.

A user's `.npz` keeps what makes it theirs: its labels (remapped to 0..C-1 for training, the originals kept in
`Splits.class_labels` for display), its cluster ids (whole clusters go either to training or to the pool) and
its item ids. With a cluster column the space is the whole file (`Splits.corpus`: users index everything they
have), each cluster tagged with the split it went to, so that honest measurement draws its queries from the
pool's clusters, which no model saw. A separate space file, when given, is the pool and the training file is
split three ways."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Splits",
    "ServedItems",
    "PARTS",
    "UserData",
    "load_dataset",
    "make_mnist1d",
    "load_digits",
    "load_npz",
    "DatasetError",
]


class DatasetError(ValueError):
    """A dataset that cannot be used as asked; the message names the problem."""


NPZ_REQUIRED = ("x", "y")
NPZ_OPTIONAL = ("cluster", "id", "classes")
"""The arrays a user's `.npz` may hold. Any other name is refused: a misspelled `clusters` would otherwise be
ignored silently, losing the user's clusters and leaking members of one cluster across the split."""


PARTS = ("train", "validation", "test", "pool")
"""Where a user's cluster went, by code: the models train on `train`, choose checkpoints and measure on
`validation`, gate uploads on `test`; no model saw a `pool` cluster."""


@dataclass(frozen=True)
class ServedItems:
    """The items a space serves: a user's whole file with a cluster column (every item tagged with the part its
    cluster went to), else the pool."""

    x: np.ndarray
    y: np.ndarray  # classes 0..C-1
    cluster: np.ndarray | None  # the user's cluster ids (None: the data has none, clusters are built)
    ids: np.ndarray | None  # the user's item ids (None: rows)
    part: np.ndarray | None  # (N,) int8, an index into PARTS (None: all of it is pool, no model saw it)


@dataclass(frozen=True)
class Splits:
    name: str
    num_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_pool: np.ndarray
    y_pool: np.ndarray
    cluster_pool: np.ndarray | None = None
    """The user's cluster id of every pool item (None: the data has no clusters of its own)."""
    id_pool: np.ndarray | None = None
    """The user's item id of every pool item (None: items are numbered by their row in the space)."""
    class_labels: np.ndarray | None = None
    """The user's label of class c at position c (None: labels are 0..C-1 already)."""
    space_source: str | None = None
    """The separate space file the pool came from (None: the pool is a split of `name`)."""
    split: str = "items"
    """How train/val/test/pool were cut: `items` (a seeded permutation of items) or `clusters` (of whole
    clusters, so that no cluster of the space lent members to training)."""
    cluster_train: np.ndarray | None = None
    """The user's cluster id of every training item (None: the training file has no clusters); with
    `cluster_val` and `cluster_test`, what pair models are trained, validated and probed on."""
    cluster_val: np.ndarray | None = None
    cluster_test: np.ndarray | None = None
    corpus: ServedItems | None = None
    """A user's file with a cluster column and no separate space file: all of it, the space to serve (None:
    the space is the pool)."""

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def labels(self) -> np.ndarray:
        """The user's label of every class, in class order."""
        return np.arange(self.num_classes) if self.class_labels is None else self.class_labels

    @property
    def served(self) -> ServedItems:
        """What the space serves: the whole corpus when there is one, else the pool."""
        if self.corpus is not None:
            return self.corpus
        return ServedItems(self.x_pool, self.y_pool, self.cluster_pool, self.id_pool, None)

    @property
    def prior(self) -> np.ndarray:
        """Class frequencies of the training split (the prior pi that `bayes` aggregation divides out)."""
        counts = np.bincount(self.y_train, minlength=self.num_classes).astype(np.float64)
        return counts / counts.sum()


@dataclass(frozen=True)
class UserData:
    """The arrays of a user's `.npz`, checked: `y` still holds the user's own labels."""

    x: np.ndarray
    y: np.ndarray
    cluster: np.ndarray | None = None
    ids: np.ndarray | None = None
    classes: np.ndarray | None = None  # declared labels, which may include labels absent from `y`


def _integers(name: str, values: np.ndarray, path: Path) -> np.ndarray:
    """Integer ids or labels; integral floats are accepted, anything else names the array."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise DatasetError(f"{path}: {name} must be one-dimensional, got shape {values.shape}")
    if np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_:
        return values.astype(np.int64)
    if np.issubdtype(values.dtype, np.floating) and np.isfinite(values).all() and (values == np.round(values)).all():
        return values.astype(np.int64)
    raise DatasetError(f"{path}: {name} must hold integers, got dtype {values.dtype}")


def _check_array_names(path: Path, names: list[str]) -> None:
    """Refuse missing required arrays and any array the format does not know, listing the known names (and the
    closest one, for a misspelling)."""
    import difflib

    known = (*NPZ_REQUIRED, *NPZ_OPTIONAL)
    listing = f"x and y, optionally {', '.join(NPZ_OPTIONAL)}"
    missing = [k for k in NPZ_REQUIRED if k not in names]
    if missing:
        raise DatasetError(f"{path} lacks arrays {missing}; an .npz holds {listing}")
    unknown = sorted(set(names) - set(known))
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, 1)
            hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        raise DatasetError(
            f"{path}: unknown array{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; an .npz holds {listing} "
            "(rename or remove the others)"
        )


def load_npz(path: Path) -> UserData:
    """A user's own data: arrays `x` (items x features), `y` (integer labels, any values), and optionally
    `cluster` (an integer cluster id per item), `id` (a unique integer id per item) and `classes` (every label
    the data may have, declared)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as f:
        _check_array_names(path, f.files)
        arrays = {k: f[k] for k in (*NPZ_REQUIRED, *NPZ_OPTIONAL) if k in f.files}
    x = arrays["x"]
    if x.ndim < 2:
        raise DatasetError(f"{path}: x must be items x features, got shape {x.shape}")
    x = x.reshape(len(x), -1)
    if not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{path}: x must be numeric, got dtype {x.dtype}")
    y = _integers("y", arrays["y"], path)
    if len(y) and y.min() < 0:
        raise DatasetError(f"{path}: labels must be non-negative integers (queries name them), found {int(y.min())}")
    if len(y) != len(x):
        raise DatasetError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    if not np.isfinite(x).all():
        raise DatasetError(f"{path}: x contains NaN or Inf")
    out: dict[str, np.ndarray | None] = {"cluster": None, "ids": None, "classes": None}
    for key, field in (("cluster", "cluster"), ("id", "ids")):
        if key in arrays:
            column = _integers(key, arrays[key], path)
            if len(column) != len(x):
                raise DatasetError(f"{path}: {key} must have one entry per row of x ({len(x)}), got {len(column)}")
            out[field] = column
    if out["ids"] is not None:
        ids = out["ids"]
        unique, counts = np.unique(ids, return_counts=True)
        if len(unique) != len(ids):
            raise DatasetError(f"{path}: id must be unique per item; {int(unique[counts > 1][0])} appears twice")
    if "classes" in arrays:
        classes = np.unique(_integers("classes", arrays["classes"], path))
        stray = np.setdiff1d(y, classes)
        if len(stray):
            raise DatasetError(f"{path}: y has labels {stray[:10].tolist()} that classes does not declare")
        out["classes"] = classes
    return UserData(x=x.astype(np.float32), y=y, **out)


def _item_parts(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """A seeded permutation of items cut at int(n * fraction) (unchanged, so existing homes re-split alike)."""
    perm = np.random.default_rng(seed).permutation(n)
    edges = [0]
    for f in fractions:
        edges.append(edges[-1] + int(n * f))
    edges.append(n)
    return [perm[a:b] for a, b in itertools.pairwise(edges)]


def _cluster_parts(cluster: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Whole clusters in a seeded order, cut where the running item count passes each fraction of the items;
    the rest is the last part. Returns the rows of each part."""
    _, inverse, sizes = np.unique(cluster, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped by cluster
    starts = np.concatenate([[0], np.cumsum(sizes)])
    perm = np.random.default_rng(seed).permutation(len(sizes))
    reach = np.cumsum(sizes[perm])
    bounds = np.searchsorted(reach, np.cumsum(fractions) * len(cluster), side="right")
    edges = [0, *(int(b) for b in bounds), len(perm)]
    parts = []
    for a, b in itertools.pairwise(edges):
        units = np.sort(perm[a:b])
        rows = [order[starts[u] : starts[u + 1]] for u in units]
        parts.append(np.concatenate(rows) if rows else np.empty(0, dtype=np.int64))
    return parts


def _parts(n: int, cluster: np.ndarray | None, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Row indices of each part: a permutation of items, or of whole clusters when the data has them."""
    return _item_parts(n, fractions, seed) if cluster is None else _cluster_parts(cluster, fractions, seed)


def _class_labels(*data: UserData) -> np.ndarray:
    declared = [d.classes for d in data if d.classes is not None]
    labels = np.unique(np.concatenate([*declared, *(d.y for d in data)]))
    if len(labels) < 2:
        raise DatasetError(f"the data has {len(labels)} distinct label(s); at least 2 are needed")
    return labels


def _from_user_data(
    name: str,
    train: UserData,
    space: UserData | None,
    space_source: str | None,
    fractions: tuple[float, float, float],
    seed: int,
) -> Splits:
    """Train/val/test/pool of a user's data: labels remapped to 0..C-1, the pool keeping the user's ids."""
    labels = _class_labels(train, *([space] if space is not None else []))
    if space is not None and space.x.shape[1] != train.x.shape[1]:
        raise DatasetError(
            f"{space_source}: items have {space.x.shape[1]} features, the training file's have {train.x.shape[1]}"
        )
    cut = fractions if space is None else tuple(f / sum(fractions) for f in fractions[:2])
    parts = _parts(len(train.x), train.cluster, cut, seed)
    if space is not None:
        pool_data = space
        parts = [*parts, np.empty(0, dtype=np.int64)]
        what = "train, validation and test"
    else:
        pool_data = train
        what = "train, validation, test and pool"
    counts = [len(p) for p in parts[:3]] + [len(parts[3]) if space is None else len(space.x)]
    if min(counts) == 0:
        unit = "clusters" if train.cluster is not None else "items"
        raise DatasetError(f"{len(train.x)} items are too few to cut into {what} by {unit} (sizes {counts})")
    y = np.searchsorted(labels, train.y)
    trained = np.unique(y[parts[0]])
    pool_rows = parts[3] if space is None else np.arange(len(space.x))
    y_pool = np.searchsorted(labels, pool_data.y)[pool_rows]
    corpus = None
    if space is None and train.cluster is not None:  # the whole file is served, every cluster of it
        part = np.empty(len(train.x), dtype=np.int8)
        for code, rows in enumerate(parts):
            part[rows] = code
        corpus = ServedItems(x=train.x, y=y, cluster=train.cluster, ids=train.ids, part=part)
    served = y_pool if corpus is None else corpus.y
    absent = np.setdiff1d(np.unique(served), trained)
    if len(absent):
        raise DatasetError(
            f"labels {labels[absent].tolist()} occur in the space but not in the training split, so no model "
            "could learn them; give more clusters of those labels (or another --seed)"
        )
    return Splits(
        name=name,
        num_classes=len(labels),
        x_train=train.x[parts[0]],
        y_train=y[parts[0]],
        x_val=train.x[parts[1]],
        y_val=y[parts[1]],
        x_test=train.x[parts[2]],
        y_test=y[parts[2]],
        x_pool=pool_data.x[pool_rows],
        y_pool=y_pool,
        cluster_pool=None if pool_data.cluster is None else pool_data.cluster[pool_rows],
        id_pool=None if pool_data.ids is None else pool_data.ids[pool_rows],
        class_labels=labels,
        space_source=space_source,
        split="clusters" if train.cluster is not None else "items",
        cluster_train=None if train.cluster is None else train.cluster[parts[0]],
        cluster_val=None if train.cluster is None else train.cluster[parts[1]],
        cluster_test=None if train.cluster is None else train.cluster[parts[2]],
        corpus=corpus,
    )


def _split(name: str, x: np.ndarray, y: np.ndarray, fractions: tuple[float, float, float], seed: int) -> Splits:
    """Built-in data (labels 0..C-1, no clusters): split by a seeded permutation of items."""
    x = x.reshape(len(x), -1).astype(np.float32)
    y = np.asarray(y, dtype=np.int64)
    parts = _parts(len(x), None, fractions, seed)
    if min(len(p) for p in parts) == 0:
        raise DatasetError(f"{len(x)} items are too few for a train/val/test/pool split")
    return Splits(
        name=name,
        num_classes=int(y.max()) + 1,
        x_train=x[parts[0]],
        y_train=y[parts[0]],
        x_val=x[parts[1]],
        y_val=y[parts[1]],
        x_test=x[parts[2]],
        y_test=y[parts[2]],
        x_pool=x[parts[3]],
        y_pool=y[parts[3]],
    )


def make_mnist1d(num_samples: int = 52_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generate MNIST-1D locally; `get_dataset` would download, so it is never called."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = 1.0
    data = make_dataset(args)
    return data["x"].astype(np.float32), data["y"].astype(np.int64)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (shipped with the package), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _npz_path(name: str, what: str = "dataset") -> Path:
    path = Path(name)
    if path.suffix != ".npz" or not path.exists():
        raise DatasetError(f"unknown {what} {name!r}: use mnist1d, digits or a path to an existing .npz")
    return path


def load_dataset(
    name: str,
    seed: int = 0,
    num_samples: int = 52_000,
    fractions: tuple[float, float, float] = (0.4, 0.08, 0.08),
    cache_dir: Path | None = None,
    space_dataset: str | None = None,
) -> Splits:
    """`name` is `mnist1d`, `digits` or a path to an `.npz`. MNIST-1D is cached as npz once generated.
    `space_dataset` (an `.npz`): the space is that file, and `name` is split into train/val/test only."""
    if space_dataset is not None and name in ("mnist1d", "digits"):
        raise DatasetError("a separate space file needs a training .npz as the dataset")
    if name == "mnist1d":
        cached = cache_dir / f"mnist1d-n{num_samples}-s{seed}.npz" if cache_dir else None
        if cached is not None and cached.exists():
            with np.load(cached) as f:
                x, y = f["x"], f["y"]
        else:
            x, y = make_mnist1d(num_samples, seed)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(".tmp.npz")
                np.savez(tmp, x=x, y=y)
                tmp.replace(cached)
        return _split("mnist1d", x, y, fractions, seed)
    if name == "digits":
        x, y = load_digits()
        return _split("digits", x, y, fractions, seed)
    path = _npz_path(name)
    space = None
    if space_dataset is not None:
        space_path = _npz_path(space_dataset, "space dataset")
        space, space_dataset = load_npz(space_path), str(space_path.resolve())
    # named by its absolute path: manifests record it, and `prune` re-cuts the same splits from any directory
    return _from_user_data(str(path.resolve()), load_npz(path), space, space_dataset, fractions, seed)
