"""Datasets with fixed splits. The pool split is never trained on: the retrieval space is drawn from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Splits", "load_dataset", "make_mnist1d", "load_digits", "load_npz", "DatasetError"]


class DatasetError(ValueError):
    """A dataset that cannot be used as asked; the message names the problem."""


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

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def prior(self) -> np.ndarray:
        """Class frequencies of the training split (the pi of the research notes)."""
        counts = np.bincount(self.y_train, minlength=self.num_classes).astype(np.float64)
        return counts / counts.sum()


def _split(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    fractions: tuple[float, float, float],
    seed: int,
    cluster: np.ndarray | None = None,
) -> Splits:
    """Split by a seeded permutation into train/val/test/pool; `fractions` are train, val, test."""
    if x.ndim != 2:
        x = x.reshape(len(x), -1)
    if len(x) != len(y):
        raise DatasetError(f"x has {len(x)} rows but y has {len(y)}")
    if not np.isfinite(x).all():
        raise DatasetError("x contains NaN or Inf")
    y = np.asarray(y)
    if y.min() < 0:
        raise DatasetError("labels must be non-negative integers")
    perm = np.random.default_rng(seed).permutation(len(x))
    n = len(x)
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    c = b + int(n * fractions[2])
    parts = [perm[:a], perm[a:b], perm[b:c], perm[c:]]
    if min(len(p) for p in parts) == 0:
        raise DatasetError(f"{n} items are too few for a train/val/test/pool split")
    x = x.astype(np.float32)
    y = y.astype(np.int64)
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
        cluster_pool=None if cluster is None else np.asarray(cluster, dtype=np.int64)[parts[3]],
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


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A user's own data: arrays `x` (items x features), `y` (int labels), optional `cluster`."""
    with np.load(path, allow_pickle=False) as f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise DatasetError(f"{path} lacks arrays {sorted(missing)}")
        cluster = f["cluster"] if "cluster" in f.files else None
        x, y = f["x"], f["y"]
    if cluster is not None and len(cluster) != len(x):
        raise DatasetError("cluster must have one entry per row of x")
    return x, y, cluster


def load_dataset(
    name: str,
    seed: int = 0,
    num_samples: int = 52_000,
    fractions: tuple[float, float, float] = (0.4, 0.08, 0.08),
    cache_dir: Path | None = None,
) -> Splits:
    """`name` is `mnist1d`, `digits` or a path to an `.npz`. MNIST-1D is cached as npz once generated."""
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
    path = Path(name)
    if path.suffix != ".npz" or not path.exists():
        raise DatasetError(f"unknown dataset {name!r}: use mnist1d, digits or a path to an existing .npz")
    x, y, cluster = load_npz(path)
    return _split(path.stem, x, y, fractions, seed, cluster)
