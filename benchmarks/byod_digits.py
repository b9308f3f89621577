"""A user's `.npz` with clusters, made from scikit-learn's 8x8 digits (shipped with the package, no download), for
the bring-your-own-data walkthrough of pair models (docs/results.md).

`--clusters views` (instance structure): each of the 1,797 images is a cluster of `--views` near duplicates, the
image shifted by up to one pixel in each direction (zeros shifted in) plus Gaussian noise of std `--noise`
(pixel values in [0, 1]). `--clusters random` (none): the same items, each digit's dealt into clusters of the
same sizes at random, so a cluster says nothing about an item beyond its label.

    PYTHONPATH=. python benchmarks/byod_digits.py --out digits-views.npz [--clusters views|random]
    prunecascade bootstrap --dataset digits-views.npz --home var-digits
    prunecascade evaluate --home var-digits --examples 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.data import load_digits


def shifted(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Each (8, 8) image moved by (dy, dx) in {-1, 0, 1}, zeros shifted in."""
    out = np.zeros_like(images)
    for sy in (-1, 0, 1):
        for sx in (-1, 0, 1):
            rows = np.flatnonzero((dy == sy) & (dx == sx))
            src = images[rows]
            moved = np.zeros_like(src)
            ys, yd = (slice(0, 8 - sy), slice(sy, 8)) if sy >= 0 else (slice(-sy, 8), slice(0, 8 + sy))
            xs, xd = (slice(0, 8 - sx), slice(sx, 8)) if sx >= 0 else (slice(-sx, 8), slice(0, 8 + sx))
            moved[:, yd, xd] = src[:, ys, xs]
            out[rows] = moved
    return out


def make(views: int, noise: float, clusters: str, seed: int) -> dict[str, np.ndarray]:
    x, y = load_digits()
    rng = np.random.default_rng(seed)
    n = len(x)
    base = np.repeat(np.arange(n), views)
    images = x[base].reshape(-1, 8, 8)
    dy, dx = rng.integers(-1, 2, size=len(base)), rng.integers(-1, 2, size=len(base))
    items = shifted(images, dy, dx).reshape(len(base), 64) + noise * rng.standard_normal((len(base), 64))
    labels, cluster = y[base], base.copy()
    if clusters == "random":
        for digit in np.unique(labels):
            rows = np.flatnonzero(labels == digit)
            cluster[rng.permutation(rows)] = cluster[rows]
    return {"x": items.astype(np.float32), "y": labels, "cluster": cluster}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--clusters", choices=("views", "random"), default="views")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    arrays = make(args.views, args.noise, args.clusters, args.seed)
    np.savez(args.out, **arrays)
    print(f"{args.out}: {len(arrays['x'])} items, {len(np.unique(arrays['cluster']))} clusters ({args.clusters})")


if __name__ == "__main__":
    main()
