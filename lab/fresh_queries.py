"""Replace a prototype home's held-out queries by N fresh views of its space's prototypes, drawn with another query
seed, so that `prunecascade evaluate --split all` and `prunecascade reader --check` measure on more queries than the
bootstrap's 500 (a copy of the home: this overwrites its queries file). `--space` names another prototype space of
the home, such as the 100k space `benchmarks.bench_pair prepare` renders, whose prototypes its meta records (checked
by rendering its items again).

    python -m lab.fresh_queries HOME-COPY 2000 --seed 11
    python -m lab.fresh_queries HOME-COPY 2000 --seed 11 --space pairbig
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cascade.bootstrap_config import PairConfig
from cascade.queries import QUERIES_FILE, QuerySet
from cascade.space import Space
from lab.ceiling import space_config_of
from models.prototypes import PrototypeConfig, make_queries


def space_config(home: Path) -> PrototypeConfig:
    """The prototypes the home's space was rendered from: its bootstrap's record, else the default recipe's."""
    recorded = home / "bootstrap.json"
    fields = json.loads(recorded.read_text()).get("pair", {}).get("space") if recorded.exists() else None
    if not fields:
        return PairConfig().space
    return PrototypeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("home", type=Path)
    ap.add_argument("count", type=int)
    ap.add_argument("--seed", type=int, default=11, help="query seed (the bootstrap's own queries use 0)")
    ap.add_argument("--space", default="default", help="the space whose queries are replaced")
    args = ap.parse_args()
    space_dir = args.home / "spaces" / args.space
    if not (space_dir / QUERIES_FILE).exists():
        raise SystemExit(f"{space_dir / QUERIES_FILE} does not exist: not a bootstrapped home")
    meta = Space.load(space_dir).meta
    config = space_config(args.home) if args.space == "default" else space_config_of(space_dir)
    if meta.get("clusters") != "prototypes" or meta.get("num_clusters") != config.num_prototypes:
        raise SystemExit(f"{space_dir} is not a space of the {config.num_prototypes} recorded prototypes")
    xq, cq, yq = make_queries(config, args.count, seed=args.seed)
    QuerySet(x=xq, cluster=cq, label=yq).save(space_dir)
    print(f"{space_dir / QUERIES_FILE}: {len(xq)} queries of {len(np.unique(cq))} clusters (seed {args.seed})")


if __name__ == "__main__":
    main()
