"""The HTTP contract. Validation here names the offending field; what depends on the loaded space (label
range, feature length, known variants) is checked against the snapshot and reported the same way."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cascade.config import Stage

__all__ = [
    "Target",
    "QueryRequest",
    "ClusterHit",
    "StageOut",
    "QueryResponse",
    "CascadeOut",
    "ModelsOut",
    "SpaceOut",
    "UploadOut",
    "ActivateRequest",
    "AdminStateOut",
]

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class Target(BaseModel):
    """Exactly one of: a label, a utility vector over classes, or example items (query by example)."""

    model_config = _STRICT

    label: int | None = Field(None, ge=0)
    utility: list[float] | None = Field(None, min_length=1, max_length=10_000)
    examples: list[list[float]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        given = [k for k in ("label", "utility", "examples") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of label, utility or examples")
        return self


class QueryRequest(BaseModel):
    model_config = _STRICT

    target: Target
    k: int = Field(10, ge=1, description="clusters to return")
    stages: list[Stage] | None = Field(None, min_length=1, max_length=8, description="override the default cascade")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seeds the member sampling; same seed, same answer")
    candidates: int | None = Field(None, ge=1, description="clusters the index proposes for a query by example")


class ClusterHit(BaseModel):
    cluster_id: int
    score: float = Field(description="expected utility under the final stage's cluster posterior")
    posterior: list[float] = Field(description="the final stage's class posterior for the cluster")


class StageOut(BaseModel):
    variant: str
    version: int
    aggregator: str
    clusters_in: int
    kept: int
    samples: int
    items: int
    flops: int = Field(description="nonzero-weight FLOPs of this stage (what a sparse kernel would do)")
    flops_dense_kernel: int
    ms: float


class QueryResponse(BaseModel):
    clusters: list[ClusterHit]
    stages: list[StageOut]
    flops: int = Field(description="sum of the stages' flops")
    flops_dense_kernel: int
    dense_flops: int = Field(description="what the dense exhaustive oracle would have cost")
    target_flops: int = Field(description="dense passes spent turning examples into a target")
    latency_ms: float
    snapshot_id: str
    cached: bool = Field(False, description="served from the result cache (same query, same snapshot)")


class CascadeOut(BaseModel):
    stages: list[Stage]
    dense: str


class ModelsOut(BaseModel):
    models: list[dict[str, Any]]


class SpaceOut(BaseModel):
    name: str
    num_items: int
    num_clusters: int
    num_classes: int
    input_dim: int
    max_cluster_size: int
    snapshot_id: str


class UploadOut(BaseModel):
    """A stored, still inactive version; FLOPs and accuracy are the server's own measurements."""

    name: str
    version: int
    sha256: str
    flops_dense_kernel: int
    flops_nonzero: int
    accuracy: float
    active: bool


class ActivateRequest(BaseModel):
    model_config = _STRICT

    version: int | None = Field(None, ge=1, le=2**31 - 1, description="default: the newest version")


class AdminStateOut(BaseModel):
    snapshot_id: str
    active: dict[str, int] = Field(description="the active version of every model")
    served: dict[str, int] = Field(description="the versions the current snapshot serves (those fitting the space)")
