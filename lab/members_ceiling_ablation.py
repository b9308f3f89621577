"""Ablations of the members-only ceiling's oracle variant (`lab.members_ceiling`: true relative jitters and template
block, template and shear fitted to the members by GLS) on the dev queries: the generator's full noise covariance,
its diagonal only, and the diagonal without the fit's uncertainty (plug-in).

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m lab.members_ceiling_ablation full|diag|diag_plugin
"""

from __future__ import annotations

import sys

import numpy as np

from lab.ceiling import ceiling_metrics
from lab.members_ceiling import Model, score_queries
from models.prototypes import PrototypeConfig, make_prototype_set, make_prototypes, make_queries, views_rng


def main() -> None:
    mode = sys.argv[1]
    config = PrototypeConfig(num_prototypes=2300)
    protos = make_prototypes(config, "space")
    space = make_prototype_set(config, "space")
    k, m = 2300, 10
    tj = views_rng(config).integers(-3, 4, size=k * m).reshape(k, m)
    xq, cq, yl = make_queries(config, 500, seed=0)
    xq, cq, yl = xq[1::2], cq[1::2], yl[1::2]
    model = Model(config)
    yq = model.raw(xq)
    if mode.startswith("diag"):
        for li in range(model.chol.shape[0]):
            for a in range(model.g):
                dg = np.diag(np.diag(model.chol[li, a] @ model.chol[li, a].T))
                model.chol[li, a] = np.sqrt(dg)
                model.prec[li, a] = np.linalg.inv(dg)
                model.logdet[li, a] = np.log(np.diag(dg)).sum()
    scores = np.empty((len(yq), k))
    for c in range(k):
        y = model.raw(space.x[c * m : (c + 1) * m])
        d = tj[c] - tj[c, 0]
        a = int(protos.translation[c] + tj[c, 0]) % model.g
        length = int((protos.base[c] != 0).sum())
        _, theta, h = model.fit(y, a, length, d)
        if "plugin" in mode:
            h = h * 1e9  # the fit's uncertainty A H^-1 A^T vanishes
        scores[:, c] = score_queries(model, yq, (a, length, d, theta, h), config.jitter)
    print(mode, ceiling_metrics(scores, cq, yl, protos.digit))


if __name__ == "__main__":
    main()
