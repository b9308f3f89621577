"""A small embedded default for deploy/compose-check.sh: the same pipeline, artefact names and shape as
`prunecascade bootstrap` (MNIST-1D, dense CNN, greedy-pruned cnn-s25 and cnn-s50, and where this version has
them the pair models with their prototype space), but small enough to build in seconds instead of minutes.
The stages are given explicitly so the check does not depend on the default cascade of the day.

    PRUNECASCADE_HOME=/data python tiny_bootstrap.py
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from cascade import bootstrap as boot
from cascade.config import Stage

try:  # the bootstrap's settings, in a module of their own since `cascade.bootstrap_config`; before it, in the bootstrap
    from cascade import bootstrap_config as settings
except ImportError:
    settings = boot

__all__ = ["TINY", "main", "tiny_pair"]


def tiny_pair() -> Any:
    """A small PairConfig (the sizes of the test suite's), or None where this version has no pair models."""
    if not hasattr(settings, "PairConfig"):
        return None
    from models.biencoder_training import BiEncoderTrainConfig
    from models.pair_training import PairTrainConfig
    from models.prototypes import PrototypeConfig

    fields = {f.name for f in dataclasses.fields(settings.PairConfig)}
    listwise: dict[str, Any] = {}
    if "listwise" in fields:  # the dense pair model trains on the retriever's candidate lists
        from models.pair_training import ListwiseConfig

        listwise["listwise"] = ListwiseConfig(
            steps=150, queries=16, group=8, members=2, top=16, eval_every=50, val_queries=128
        )
    return settings.PairConfig(
        **listwise,
        space=PrototypeConfig(num_prototypes=150, views=6),
        train=PrototypeConfig(num_prototypes=300),
        queries=40,
        biencoder=BiEncoderTrainConfig(steps=150, batch_prototypes=64, eval_every=50),
        training=PairTrainConfig(steps=300, eval_every=100, val_pairs=500),
        hidden=(64, 32),
        variants=(settings.PrunedPairVariant("pair-s25", "greedy-asymmetric", 0.25, finetune_steps=50),),
        stages=(Stage(variant="pair-s25", samples=2, keep=20), Stage(variant="pair-dense", samples=6)),
    )


_PAIR = {"pair": tiny_pair()} if "pair" in {f.name for f in dataclasses.fields(settings.BootstrapConfig)} else {}

TINY = settings.BootstrapConfig(
    num_samples=8_000,
    epochs=3,
    variants=(
        settings.PrunedVariant("cnn-s25", "greedy-asymmetric", 0.25, reweight=True),
        settings.PrunedVariant("cnn-s50", "greedy-asymmetric", 0.5, reweight=True),
    ),
    stages=(
        Stage(variant="cnn-s25", samples=2, keep=200, aggregator="bayes"),
        Stage(variant="cnn-s50", samples=4, keep=40, aggregator="bayes"),
        Stage(variant="dense", samples=10, aggregator="bayes"),
    ),
    **_PAIR,
)


def main() -> None:
    torch.set_num_threads(1)
    home = Path(os.environ.get("PRUNECASCADE_HOME", "/data"))
    config = boot.bootstrap(home, TINY, progress=False)
    print(f"tiny bootstrap ready under {home}: cascade " + " -> ".join(s.variant for s in config.stages))


if __name__ == "__main__":
    main()
