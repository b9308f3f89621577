"""A small embedded default for deploy/compose-check.sh: same pipeline and artefact names as
`prunecascade bootstrap` (MNIST-1D, dense CNN, greedy-pruned cnn-s25 and cnn-s50, space, index, cascade), but
8,000 samples and 3 epochs, so the check bootstraps its volume in seconds instead of minutes. The stages are
given explicitly so the check does not depend on the default cascade of the day.

    PRUNECASCADE_HOME=/data python tiny_bootstrap.py
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cascade.bootstrap import BootstrapConfig, PrunedVariant, bootstrap
from cascade.config import Stage

__all__ = ["TINY", "main"]

TINY = BootstrapConfig(
    num_samples=8_000,
    epochs=3,
    variants=(
        PrunedVariant("cnn-s25", "greedy-asymmetric", 0.25, reweight=True),
        PrunedVariant("cnn-s50", "greedy-asymmetric", 0.5, reweight=True),
    ),
    stages=(
        Stage(variant="cnn-s25", samples=2, keep=200, aggregator="bayes"),
        Stage(variant="cnn-s50", samples=4, keep=40, aggregator="bayes"),
        Stage(variant="dense", samples=10, aggregator="bayes"),
    ),
)


def main() -> None:
    torch.set_num_threads(1)
    home = Path(os.environ.get("PRUNECASCADE_HOME", "/data"))
    config = bootstrap(home, TINY, progress=False)
    print(f"tiny bootstrap ready under {home}: cascade " + " -> ".join(s.variant for s in config.stages))


if __name__ == "__main__":
    main()
