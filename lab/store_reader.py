"""Store a reader that lab/cluster_reader.py trained (its .pt and .json) beside a home's space, in the format the
service serves (`models.cluster_reader_store`), so that `prunecascade reader --check` can measure it. The .pt must
come from a run on that home's retriever.

    PYTHONPATH=. python -m lab.store_reader /work/scratch-reader/RUN.json --home HOME
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cascade.embedding import EmbeddingIndex
from models.cluster_reader import ReaderSpec, build_ranker
from models.cluster_reader_store import save_reader
from service.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="the lab run's .json (its .pt beside it)")
    ap.add_argument("--home", required=True)
    args = ap.parse_args()
    run = json.loads(args.run.read_text())
    a = run["args"]
    if a.get("trainable"):
        raise SystemExit("a run that trained its trunk is not stored by this script")
    space_dir = Settings(home=args.home).space_dir
    embedding = EmbeddingIndex.load(space_dir)
    assert embedding is not None
    keys = ("feature", "mode", "d", "dv", "hidden", "max_shift")
    spec = ReaderSpec(encoder=embedding.encoder.spec.to_dict(), **{k: a[k] for k in keys})  # type: ignore[operator]
    ranker = build_ranker(spec)
    ranker.load_state_dict(torch.load(args.run.with_suffix(".pt")), strict=True)
    extra = {
        "source": str(args.run),
        "args": a,
        "seconds": run.get("train_seconds"),
        # step 0 has no loss yet (NaN, which JSON cannot hold)
        "trajectory": [{k: v for k, v in row.items() if v == v} for row in run.get("trajectory", [])],
    }
    digest = save_reader(ranker.eval(), spec, space_dir, extra=extra)
    print(f"stored beside {space_dir}: sha256 {digest}")


if __name__ == "__main__":
    main()
