"""The bi-encoder network: an item embedding for FAISS candidates (stage 0 of a query by example).

A small 1-D CNN (trained by `models.biencoder_training`). Embeddings are L2-normalised, so inner product =
cosine and a cluster's centroid is the normalised mean of its members. This module is what serving loads: the
network, its spec, embedding in batches, centroids, and safetensors storage; it imports nothing that trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BiEncoderSpec",
    "BiEncoder",
    "spec_for",
    "cluster_centroids",
    "embed_numpy",
    "save_biencoder",
    "load_biencoder",
]

_WEIGHTS, _SPEC = "biencoder.safetensors", "biencoder.json"


@dataclass(frozen=True)
class BiEncoderSpec:
    input_dim: int = 40
    channels: tuple[int, ...] = (32, 64)
    kernel_size: int = 5
    hidden: int = 128
    embed_dim: int = 64

    kind = "biencoder"

    def __post_init__(self) -> None:
        if self.input_dim <= 0 or not self.channels or min(self.channels) <= 0 or self.embed_dim <= 0:
            raise ValueError("input_dim, channels and embed_dim must be positive")
        if self.kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        if self.input_dim >> len(self.channels) < 1:
            raise ValueError("input too small for that many conv blocks")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "biencoder", **asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BiEncoderSpec:
        d = dict(d)
        if d.pop("kind", "biencoder") != "biencoder":
            raise ValueError("not a bi-encoder spec")
        unknown = set(d) - {"input_dim", "channels", "kernel_size", "hidden", "embed_dim"}
        if unknown:
            raise ValueError(f"unknown bi-encoder spec keys: {sorted(unknown)}")
        return cls(**{**d, "channels": tuple(int(c) for c in d.get("channels", (32, 64)))})


class BiEncoder(nn.Module):
    """conv-ReLU-maxpool blocks, a hidden layer, a linear embedding; `embed` L2-normalises."""

    def __init__(self, spec: BiEncoderSpec = BiEncoderSpec()) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = [nn.Unflatten(1, (1, spec.input_dim))]
        in_ch, length = 1, spec.input_dim
        for ch in spec.channels:
            layers += [
                nn.Conv1d(in_ch, ch, spec.kernel_size, padding=spec.kernel_size // 2),
                nn.ReLU(),
                nn.MaxPool1d(2),
            ]
            in_ch, length = ch, length // 2
        layers += [
            nn.Flatten(),
            nn.Linear(in_ch * length, spec.hidden),
            nn.ReLU(),
            nn.Linear(spec.hidden, spec.embed_dim),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, embed_dim), unit L2 norm."""
        return F.normalize(self.net(x), dim=1)


@torch.no_grad()
def embed_numpy(model: BiEncoder, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    return torch.cat([model.embed(xt[i : i + batch_size]) for i in range(0, len(xt), batch_size)]).numpy()


def cluster_centroids(emb: np.ndarray, cluster: np.ndarray, num_clusters: int | None = None) -> np.ndarray:
    """Normalised mean member embedding of every cluster (the IVF coarse quantizer's vectors)."""
    k = int(cluster.max()) + 1 if num_clusters is None else num_clusters
    sums = np.zeros((k, emb.shape[1]), dtype=np.float64)
    np.add.at(sums, cluster, emb)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def spec_for(input_dim: int) -> BiEncoderSpec:
    """The default bi-encoder for any feature length: two conv-pool blocks (each halves the length) when there
    are at least 4 features, one for 2 or 3; a single feature cannot be embedded usefully and is refused."""
    if input_dim < 2:
        raise ValueError(f"a bi-encoder needs at least 2 features, got {input_dim}")
    return BiEncoderSpec(input_dim=input_dim, channels=(32, 64) if input_dim >= 4 else (32,))


def save_biencoder(model: BiEncoder, directory: Path, extra: dict[str, Any] | None = None) -> Path:
    """Weights (safetensors) first, then `biencoder.json` (spec, sha256 of the weights, extra), each renamed
    into place, so a reader never loads a half-written pair. Returns the JSON's path."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{_WEIGHTS}.tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, directory / _WEIGHTS)
    meta = directory / f".{_SPEC}.tmp"
    meta.write_text(json.dumps({"spec": model.spec.to_dict(), "sha256": digest, "extra": extra or {}}, indent=2))
    os.replace(meta, directory / _SPEC)
    return directory / _SPEC


def load_biencoder(directory: Path) -> BiEncoder:
    """The bi-encoder stored by `save_biencoder`; refuses weights that do not match the recorded sha256."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / _SPEC).read_text())
    weights = directory / _WEIGHTS
    if hashlib.sha256(weights.read_bytes()).hexdigest() != meta["sha256"]:
        raise ValueError(f"{weights}: weights do not match biencoder.json's sha256")
    model = BiEncoder(BiEncoderSpec.from_dict(meta["spec"]))
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()
