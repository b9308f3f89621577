"""Is the cluster reader's gap to the members-only ceiling variance or bias? Several readers trained apart (other
seeds or options, the same recipe) rerank FAISS top 50 of the dev queries alone and as an ensemble (the mean of
their keys). Where the ensemble beats its best member by much, more of the same model (or averaging) pays; where it
does not, the readers share their errors and a different model is needed.

    PYTHONPATH=. OMP_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1 PRUNECASCADE_HOME=/work/homes/h3 \\
        python -m lab.reader_ensemble RUN.json [RUN.json ...] --out OUT.json

Each RUN.json is a `lab.cluster_reader` run whose weights sit beside it (RUN.pt); its args rebuild the reader.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch
from torch import nn

from cascade.bootstrap import prototype_training_sets
from cascade.bootstrap_config import PairConfig
from lab.cluster_reader import r1_gain, rerank, summary
from lab.reranker_study import load_retriever
from models.cluster_reader import ClusterReader, MemberFeatures, ReaderRanker
from models.prototypes import PrototypeConfig, make_prototype_set, make_queries


def load_run(path: str, retriever, sample: torch.Tensor) -> ReaderRanker:
    with open(path) as f:
        args = json.load(f)["args"]
    trunk = MemberFeatures(retriever, args["feature"], False, sample)
    with torch.no_grad():
        shape = trunk(sample[:1]).shape
    reader = ClusterReader(
        shape[2],
        shape[1],
        args["mode"],
        args["d"],
        args["dv"],
        args["hidden"],
        args["max_shift"],
        args.get("context", 0),
        args.get("nearest", False),
        args.get("shift", False),
        args.get("upsample", 1),
    )
    model = ReaderRanker(trunk, reader)
    model.load_state_dict(torch.load(path.removesuffix(".json") + ".pt"))
    return model.eval()


class MeanOfKeys(nn.Module):
    """The readers' keys averaged (each: reader + its own residual); `reader` is the first's, for the residual's
    weight that `rerank` subtracts for its reader-alone column (not reported here)."""

    def __init__(self, models: list[ReaderRanker]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.reader = models[0].reader

    def scores(self, q, members, rs):
        return torch.stack([m.scores(q, members, rs) for m in self.models]).mean(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--M", type=int, default=50)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("PRUNECASCADE_TORCH_THREADS", "1")))
    retriever = load_retriever()
    retriever.requires_grad_(False)
    train, _ = prototype_training_sets(PairConfig())
    sample = torch.from_numpy(train.x[:: max(1, len(train.x) // 4000)])
    models = [load_run(p, retriever, sample) for p in args.runs]
    space_cfg = PrototypeConfig(num_prototypes=2300)
    xq, cq, yq = make_queries(space_cfg, 500, seed=0)
    dev = slice(1, None, 2)
    space = make_prototype_set(space_cfg, "space")
    out: dict = {"runs": args.runs, "M": args.M}
    rows = {}
    for name, model in [*zip(args.runs, models, strict=True), ("ensemble", MeanOfKeys(models))]:
        faiss_rows, reranked, _, _, _ = rerank(model, retriever, space, xq[dev], cq[dev], yq[dev], args.M)
        rows[name] = reranked
        out[name] = {"reader": summary(reranked), **r1_gain(reranked, faiss_rows)}
        out["faiss"] = summary(faiss_rows)
        print(name, json.dumps(out[name]), flush=True)
    best = max(args.runs, key=lambda n: out[n]["reader"]["r1"])
    diff = np.array(rows["ensemble"])[:, 0] - np.array(rows[best])[:, 0]
    out["ensemble_minus_best"] = {
        "best": best,
        "r1_diff": round(float(diff.mean()), 4),
        "r1_diff_se": round(float(diff.std(ddof=1) / math.sqrt(len(diff))), 4),
    }
    print("ensemble - best", json.dumps(out["ensemble_minus_best"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
