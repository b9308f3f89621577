"""The wider bi-encoder of issue 21 (channels 64/128, hidden 256, 128-d embedding, 4,000 steps), trained the way the
bootstrap trains its stage 0 (`train_biencoder` on `prototype_training_sets(PairConfig())`, seed 0), saved with
`save_biencoder` so `lab.pair_scaling --retriever DIR` can rerank on top of it.

    PYTHONPATH=. OMP_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1 nice -n 5 python -m lab.wide_biencoder \\
        --out /work/scratch-s7/scale/wide_be
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import torch

from cascade.bootstrap import prototype_training_sets
from cascade.bootstrap_config import PairConfig
from models.biencoder import BiEncoderSpec, save_biencoder
from models.biencoder_training import train_biencoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--embed", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("PRUNECASCADE_TORCH_THREADS", "1")))
    pair = PairConfig()
    train, val = prototype_training_sets(pair)
    spec = BiEncoderSpec(40, tuple(args.channels), 5, args.hidden, args.embed)
    load = os.getloadavg()
    t = time.perf_counter()
    model = train_biencoder(train, val, replace(pair.biencoder, steps=args.steps, seed=0), spec=spec)
    seconds = time.perf_counter() - t
    info = {"seconds": seconds, "load_start": load, "load_end": os.getloadavg(), "spec": spec.to_dict()}
    save_biencoder(model, args.out, extra=info)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
