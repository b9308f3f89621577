"""Stage 0 of a query by example: a bi-encoder embeds the query once, and a FAISS IVF over the embeddings of
the space's items, whose coarse quantizer holds the cluster centroids in that embedding, proposes the M
nearest clusters. Raw-feature L2 is a poor neighbourhood for MNIST-1D (translations); a learned embedding is
not. The encoder is stored beside the space it indexes, since the index is only valid for its embedding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cascade.index import ClusterIndex
from models.biencoder import BiEncoder, BiEncoderSpec
from models.flops import count_flops
from models.registry import sha256_file, state_dict_for_saving

__all__ = ["EmbeddingIndex", "ENCODER_WEIGHTS", "ENCODER_SPEC", "EMBEDDING_INDEX_FILE", "embed_chunked"]

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_SPEC = "encoder.json"
EMBEDDING_INDEX_FILE = "embedding.faiss"


def embed_chunked(encoder: torch.nn.Module, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Embeddings of every row of `x` (float32), a chunk at a time."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), chunk):
            out.append(encoder.embed(torch.from_numpy(np.ascontiguousarray(x[i : i + chunk]))).float().numpy())  # type: ignore[operator]
    return np.concatenate(out) if out else np.empty((0, 0), dtype=np.float32)


@dataclass(frozen=True)
class EmbeddingIndex:
    encoder: torch.nn.Module
    index: ClusterIndex
    flops_per_query: int
    """FLOPs of embedding one example (the only per-query cost of stage 0 besides the centroid search)."""

    def candidates(self, examples: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The `count` clusters nearest to the examples (round-robin over examples), with squared distances."""
        return self.embed_and_search(examples, count)[:2]

    def embed_and_search(self, examples: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `candidates`, with the examples' embeddings it searched with (examples, d): a later stage that reads
        the retriever's score (the cluster reader's residual) takes them instead of embedding the examples again."""
        vectors = embed_chunked(self.encoder, examples)
        return (*self.index.nearest_clusters_with_distances(vectors, count), vectors)

    @classmethod
    def build(cls, encoder: torch.nn.Module, features: np.ndarray, offsets: np.ndarray) -> EmbeddingIndex:
        vectors = embed_chunked(encoder.eval(), features)
        flops = count_flops(encoder, encoder.spec.input_dim).nonzero  # type: ignore[union-attr]
        return cls(encoder, ClusterIndex.from_vectors(vectors, offsets), flops)

    def save(self, directory: Path) -> None:
        """Weights, then the index, then the spec (with the weights' sha256) last: its presence marks a
        complete set."""
        tmp = directory / f".{ENCODER_WEIGHTS}.tmp"
        save_file(state_dict_for_saving(self.encoder), str(tmp))
        digest = sha256_file(tmp)
        tmp.replace(directory / ENCODER_WEIGHTS)
        self.index.save(directory, EMBEDDING_INDEX_FILE)
        meta = {"spec": self.encoder.spec.to_dict(), "sha256": digest, "flops_per_query": self.flops_per_query}  # type: ignore[operator]
        spec_tmp = directory / f".{ENCODER_SPEC}.tmp"
        spec_tmp.write_text(json.dumps(meta, indent=2))
        spec_tmp.replace(directory / ENCODER_SPEC)

    @classmethod
    def load(cls, directory: Path) -> EmbeddingIndex | None:
        """None when the space has no embedding (a space built before pair models existed)."""
        spec_file = directory / ENCODER_SPEC
        if not spec_file.exists():
            return None
        meta = json.loads(spec_file.read_text())
        weights = directory / ENCODER_WEIGHTS
        if sha256_file(weights) != meta["sha256"]:
            raise ValueError(f"{weights} does not match the sha256 in {spec_file}")
        encoder = BiEncoder(BiEncoderSpec.from_dict(meta["spec"]))
        encoder.load_state_dict(load_file(weights), strict=True)
        return cls(encoder.eval(), ClusterIndex.load(directory, EMBEDDING_INDEX_FILE), int(meta["flops_per_query"]))
