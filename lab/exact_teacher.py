"""The generator's exact posterior over a training group's clusters, as soft targets for a learned reader.

A diagnosis, not a recipe a user's clusters could follow: it asks whether the reader is limited by what it can
represent or by what its hard labels teach it. The group's posterior is the ceiling's (lab/ceiling.py: the exact
likelihood of the query under each prototype, jitter marginalised, uniform prior), restricted to the group and
renormalised. The factors of every training prototype's view Gaussians are computed once (float32 Cholesky
factors, 4,000 prototypes x 7 jitters: about 180 MB), so a training step pays only triangular solves.
"""

from __future__ import annotations

import numpy as np
import torch

from lab.ceiling import view_gaussians
from models.prototypes import Prototypes


class ExactTeacher:
    def __init__(self, protos: Prototypes, chunk: int = 200) -> None:
        means, chols, logdets = [], [], []
        for start in range(0, len(protos), chunk):
            mean, cov = view_gaussians(protos, np.arange(start, min(start + chunk, len(protos))))
            chol = torch.linalg.cholesky(cov)
            logdets.append(2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1))
            means.append(mean.float())
            chols.append(chol.float())
        self.mean = torch.cat(means)  # (K, S, D)
        self.chol = torch.cat(chols)  # (K, S, D, D)
        self.logdet = torch.cat(logdets)  # (K, S) float64

    @torch.no_grad()
    def log_posterior(self, q: torch.Tensor, clusters: np.ndarray, temperature: float = 1.0) -> torch.Tensor:
        """log p(cluster | query, the query's cluster is one of `clusters`) for queries (B, D) and groups (B, G),
        the log-likelihoods divided by `temperature` first (above 1: softer targets)."""
        c = torch.from_numpy(np.asarray(clusters, dtype=np.int64))
        diff = (q.double()[:, None, None, :] - self.mean[c].double())[..., None]  # (B, G, S, D, 1)
        white = torch.linalg.solve_triangular(self.chol[c].double(), diff, upper=False)[..., 0]
        ll = torch.logsumexp(-0.5 * ((white**2).sum(-1) + self.logdet[c]), dim=-1)  # (B, G)
        return torch.log_softmax(ll / temperature, dim=1).float()


def soft_cross_entropy(keys: torch.Tensor, log_target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the keys' softmax over each group (B, G) against a target distribution given by its logs."""
    return -(log_target.exp() * torch.log_softmax(keys, dim=1)).sum(1).mean()
