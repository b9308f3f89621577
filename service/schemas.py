"""The HTTP contract. Validation here names the offending field; what depends on the loaded space (label
range, feature length, known variants) is checked against the snapshot and reported the same way."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from cascade.config import ReaderChoice, Stage
from cascade.target import RANKING_KEYS
from cascade.tuning_record import TuningRecord

__all__ = [
    "QueryBatchRequest",
    "QueryBatchResponse",
    "PlainInt",
    "Target",
    "QueryRequest",
    "ClusterHit",
    "StageOut",
    "QueryResponse",
    "CascadeOut",
    "ModelsOut",
    "BrokenEntryOut",
    "SpaceOut",
    "UploadOut",
    "ActivateRequest",
    "AdminStateOut",
]

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

_PLAIN_INT = re.compile(r"-?(0|[1-9][0-9]*)")


def _plain_int(value: Any) -> Any:
    """A path id as written: digits, at most a leading minus, no leading zeros. Python's `int()` (and so the
    lax parse) also takes `1_000`, `+1` and ` 1`, which would give one resource several URLs."""
    if isinstance(value, str) and not _PLAIN_INT.fullmatch(value):
        raise ValueError("an integer written plainly: digits only, no sign but '-', spaces, '_' or leading zeros")
    return value


PlainInt = Annotated[int, BeforeValidator(_plain_int)]
"""An integer path parameter that accepts only its one plain spelling."""


class Target(BaseModel):
    """Exactly one of: a label, a utility vector over classes, or example items (a query by example)."""

    model_config = _STRICT

    label: int | None = Field(None, ge=0, description="return the clusters most surely of this label")
    utility: list[float] | None = Field(
        None, min_length=1, max_length=10_000, description="one weight per class; clusters ranked by expected utility"
    )
    examples: list[list[float]] | None = Field(
        None,
        description="query objects (each a vector of the items' features): the pair models read each with every "
        "item; several examples average the clusters' grade posteriors, at a proportional cost. At most the "
        "server's `max_examples` (PRUNECASCADE_MAX_EXAMPLES, 64 by default) per query",
    )
    gains: list[float] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="with examples: the value of each relevance grade (other, same label, same cluster); "
        "default [0, 1, 3]",
    )

    @field_validator("examples", mode="before")
    @classmethod
    def _rectangular(cls, value: Any) -> Any:
        """One error for the whole field, checked before pydantic looks at each element: a ragged or huge list
        must not turn into one error per element. (How many examples a query may have is one limit, the
        `max_examples` setting, checked by the route; the body-size limit bounds what reaches this.)"""
        if value is None:
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("a non-empty list of examples, each a list of numbers")
        width = len(value[0]) if isinstance(value[0], list) else -1
        for row in value:
            if not isinstance(row, list) or len(row) != width or width == 0:
                raise ValueError("every example must be a non-empty list of numbers of the same length")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
                raise ValueError("every example must contain numbers only")
        return value

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
    mode: Literal["auto", "exact", "cascade"] = Field(
        "auto",
        description="auto: label and utility targets are answered exactly from the dense cluster posteriors once "
        "they are built (before that, by the cascade); queries by example by the cluster reader where it beat FAISS "
        "alone on dev queries (GET /v1/space, reader), else by the default pair cascade. exact: only the table (503 "
        "while it builds). cascade: always the cascade, never the reader (research, load tests).",
    )
    stages: list[Stage] | None = Field(
        None,
        max_length=8,
        description="override the default cascade; [] (queries by example only) answers from FAISS alone",
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seeds the member sampling; same seed, same answer")
    candidates: int | None = Field(
        None, ge=1, description="with examples: clusters the embedding index proposes (stage 0's M)"
    )
    quality: float | None = Field(
        None,
        gt=0,
        le=1,
        description="with examples, instead of stages and candidates: the cheapest plan on the tuned front "
        "(GET /v1/cascade, pair_tuning.front) whose relative nDCG@10 to the dense rerank reaches this, by its "
        "lower confidence bound on dev queries; the cluster reader this space serves by default answers instead "
        "where it does at least as well as that plan on dev queries (recall@1, nDCG@10) at no more FLOPs",
    )


class ClusterHit(BaseModel):
    cluster_id: int
    score: float = Field(
        description="expected utility under the final cluster posterior (gains x grade posterior for a query by "
        "example); minus the squared embedding distance for a FAISS-only answer"
    )
    ranking_value: float = Field(description="the value the clusters are ranked by; its name is `ranking`")
    posterior: list[float] = Field(description="the final posterior over `outputs` (classes or relevance grades)")


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
    mode: Literal["exact", "cascade", "faiss", "reader"] = Field(
        description="what answered: the exact table, the cascade, the embedding index alone, or the cluster reader "
        "over the index's top candidates"
    )
    ranking: str = Field(
        description="what `ranking_value` is: " + "; ".join(f"{k}: {v}" for k, v in RANKING_KEYS.items())
    )
    outputs: list[str] = Field(description="what each posterior entry is the probability of")
    clusters: list[ClusterHit]
    stages: list[StageOut]
    flops: int = Field(description="sum of the stages' flops")
    flops_dense_kernel: int
    dense_flops: int = Field(description="what the dense exhaustive oracle would have cost (every item, dense model)")
    target_flops: int = Field(description="spent turning examples into a target (embedding them for stage 0)")
    latency_ms: float = Field(description="this request's own server-side time (a cache hit reports its own)")
    snapshot_id: str
    cached: bool = Field(False, description="served from the result cache (same query, same snapshot)")
    warnings: list[str] = Field(
        default_factory=list,
        description="what this answer lacks: a broken model served at its previous good version, a default "
        "cascade run shorter than configured (GET /v1/models lists the broken entries), or, for a `quality`, "
        "which plan it picked and whether the cluster reader this space serves by default answered in its place",
    )


class CascadeOut(BaseModel):
    stages: list[Stage] = Field(description="classifiers: label and utility targets in mode cascade")
    dense: str
    pair_stages: list[Stage] | None = Field(
        None, description="pair models: queries by example ([] answers from FAISS alone)"
    )
    pair_dense: str | None = None
    pair_candidates: int | None = Field(None, description="stage 0's M of the default pair cascade")
    pair_tuning: TuningRecord | None = Field(
        None,
        description="how the default pair cascade was chosen (prunecascade tune, POST /v1/admin/tune): the target, "
        "the served plan's measured quality and cost on dev queries (chosen), why, the Pareto front, FAISS alone, "
        "the dense rerank and the oracle, and the provenance (models, dev queries, date)",
    )
    reader: ReaderChoice | None = Field(
        None,
        description="the cluster reader's dev check (prunecascade reader): served or not, why, FAISS alone and the "
        "reader on the same dev queries; it answers queries by example by default only where served (and only the "
        "reader and space it measured: GET /v1/space, reader)",
    )


class BrokenEntryOut(BaseModel):
    name: str
    version: int | None = Field(description="the active version that does not load (null: ACTIVE does not read)")
    error: str
    served_version: int | None = Field(description="the version served in its place (its previous good one), or null")


class ModelsOut(BaseModel):
    models: list[dict[str, Any]]
    broken: list[BrokenEntryOut] = Field(
        default_factory=list,
        description="active registry entries the current snapshot could not load; every other model is served",
    )


class SpaceOut(BaseModel):
    name: str
    dataset: str = Field(description="where the items came from")
    clusters: str = Field(description="how the clusters were made: prototypes, given, same-label or kmeans")
    served: str | None = Field(None, description="what of the data the space holds")
    seen_by_models: dict[str, Any] | None = Field(
        None,
        description="your own clusters, all served: how many clusters (and items) went to each split when the "
        "models were trained (train, validation, test) and how many no model saw (pool, where the held-out queries "
        "come from); GET /v1/clusters/{id} says it per cluster. Null where the space is only unseen items",
    )
    num_items: int
    num_clusters: int
    num_classes: int
    classes: list[int] = Field(description="the labels a label target may name, as the data spells them")
    input_dim: int
    max_cluster_size: int
    cluster_sizes: dict[str, float] = Field(description="min, median and max members per cluster")
    held_out_queries: int = Field(description="queries by example shipped with the space (GET /v1/space/queries)")
    num_grades: int = Field(description="relevance grades of the pair models (0: no pair models)")
    grades: dict[str, Any] | None = Field(
        None,
        description="on your own clusters: whether they carry instance structure, as measured at bootstrap "
        "(num_grades, default gains, instance_auc of the dense pair model on validation clusters, threshold, "
        "decision); where the grades are built in (MNIST-1D prototypes): num_grades, names, gains and "
        "source; null only without pair models",
    )
    exact: dict[str, Any] = Field(
        description="the exact table of the dense classifier's cluster posteriors: state (ready, building, disabled, "
        "failed), bytes, build_seconds, build_flops, lookup_flops, break_even_queries (build cost over the default "
        "cascade's cost per query)"
    )
    reranker: dict[str, Any] | None = Field(
        None,
        description="whether the reranker earns its place, measured on dev queries when the default pair cascade "
        "was tuned: FAISS alone, the dense rerank and the default cascade (recall@1, nDCG@10, FLOPs, ms), "
        "reranker_helps, and why the default is what it is; null where it was not tuned",
    )
    reader: dict[str, Any] | None = Field(
        None,
        description="the cluster reader stored beside the space: served (by default, for queries by example), why, "
        "its dev check against FAISS alone (recall@1, nDCG@10 on the same dev queries), how many candidates and "
        "members it reads, its sha256 and how it was trained, and `previous`, the sha256 of the reader "
        "POST /v1/admin/reader/rollback would restore (null: none); null where the space has none",
    )
    reader_training: dict[str, Any] | None = Field(
        None,
        description="with TRAIN_READER (`make run`): the cluster reader trained in the background where none was "
        "stored: state (waiting, training, done, failed, not needed), steps, the stages trained in turn (a shorter "
        "reader first), its log file, and `last`, what the home records of the latest training (pid, started, "
        "seconds, exit code, steps, and `trained`: the steps and sha256 of the last reader it stored); null when "
        "the setting is off",
    )
    item_cache: list[dict[str, Any]] = Field(
        default_factory=list,
        description="the pair models' query-independent item inputs, computed once per item and trunk: one entry per "
        "table (key, bytes, dtype, mapped: a read-only map of a file beside the space that the worker processes "
        "share, build_ms, build_flops); empty without pair models",
    )
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


class ReaderAdminOut(BaseModel):
    """The cluster reader served after an upload or a rollback, and the dev check it is served under."""

    snapshot_id: str
    sha256: str | None = Field(description="the reader now stored beside the space (null: none)")
    served: bool = Field(description="whether it answers queries by example by default")
    check: ReaderChoice | None = Field(description="its dev check (null: none kept; `prunecascade reader --check`)")


class ActivateRequest(BaseModel):
    model_config = _STRICT

    version: int | None = Field(None, ge=1, le=2**31 - 1, description="default: the newest version")


class AdminStateOut(BaseModel):
    snapshot_id: str
    active: dict[str, int] = Field(description="the active version of every model")
    served: dict[str, int] = Field(description="the versions the current snapshot serves (those fitting the space)")


class QueryBatchRequest(BaseModel):
    """Several queries in one request (`POST /v1/query/batch`), each answered as if sent alone."""

    model_config = _STRICT

    queries: list[QueryRequest] = Field(min_length=1, description="at most `max_batch_request_queries` (64)")


class QueryBatchResponse(BaseModel):
    results: list[QueryResponse] = Field(description="one answer per query, in the order of the request")
    flops: int = Field(description="the queries' FLOPs together (the cost budget applies to this sum)")
    latency_ms: float
