"""Replace a prototype home's held-out queries by N fresh views of its space's prototypes, drawn with another query
seed, so that `prunecascade evaluate --split all` and `prunecascade reader --check` measure on more queries than the
bootstrap's 500 (a copy of the home: this overwrites its queries.npz).

    python -m lab.fresh_queries HOME-COPY 2000 --seed 11
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cascade.bootstrap import PairConfig
from cascade.queries import QUERIES_FILE
from models.prototypes import make_queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("home", type=Path)
    ap.add_argument("count", type=int)
    ap.add_argument("--seed", type=int, default=11, help="query seed (the bootstrap's own queries use 0)")
    args = ap.parse_args()
    path = args.home / "spaces" / "default" / QUERIES_FILE
    if not path.exists():
        raise SystemExit(f"{path} does not exist: not a bootstrapped prototype home")
    xq, cq, yq = make_queries(PairConfig().space, args.count, seed=args.seed)
    np.savez(path, x=xq, cluster=cq, label=yq)
    print(f"{path}: {len(xq)} queries of {len(np.unique(cq))} clusters (seed {args.seed})")


if __name__ == "__main__":
    main()
