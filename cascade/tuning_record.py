"""What a tuning stores beside the default pair cascade it chose: the target, the measured plans of the Pareto
front (quality against cost on dev queries), the reference points, and where it all came from. It travels
inside `CascadeConfig`, so it is saved, shared between replicas and swapped with the plan it describes.

Query-time code reads only its front, to answer a request that names a quality instead of stages
(`cascade.plan.plan_for_quality`); measuring is `cascade/tuner.py`'s job."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cascade.stage import Stage

__all__ = ["PlanPoint", "TuneTarget", "TuningRecord", "dev_check"]

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class PlanPoint(BaseModel):
    """One plan as measured on the dev queries: means over queries (ms: median), quality relative to the dense
    rerank of FAISS top M (`rel_ndcg`, `agreement`) and against the truth (`recall_at_1`, `ndcg`)."""

    model_config = _FROZEN

    name: str
    candidates: int = Field(ge=1, description="stage 0's M")
    stages: tuple[Stage, ...] = Field(description="[] is FAISS only")
    rel_ndcg: float = Field(
        description="nDCG@10 of the plan's top 10 with the dense rerank's expected gains as relevance, over the "
        "dense rerank's own top 10 (1 = as good as the dense rerank, by the dense model's judgement)"
    )
    rel_ndcg_low: float = Field(description="one-sided lower confidence bound of rel_ndcg (bootstrap over queries)")
    agreement: float = Field(description="share of the dense rerank's top 10 in the plan's top 10")
    recall_at_1: float = Field(description="the query's own cluster ranked first (truth)")
    ndcg: float = Field(description="graded nDCG@10 against the truth, with the space's default gains")
    flops: float = Field(description="FLOPs per query, stage 0 (embedding the query) included")
    ms: float = Field(
        description="median wall time per query, stage 0 included, one torch thread; the front's plans and the "
        "dense rerank are timed again at the end, side by side on the first 50 dev queries"
    )
    queries: int


class TuneTarget(BaseModel):
    """What the operator asked for: a quality (relative nDCG@10 to the dense rerank, met by the lower
    confidence bound), or a budget of FLOPs or milliseconds per query (the best plan within it)."""

    model_config = _FROZEN

    kind: Literal["quality", "flops", "ms"]
    value: float = Field(gt=0)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)

    def describe(self) -> str:
        if self.kind == "quality":
            return f"relative nDCG@10 >= {self.value:g} at {self.confidence:.0%} confidence"
        unit = "FLOPs" if self.kind == "flops" else "ms"
        return f"the best relative nDCG@10 within {self.value:,.6g} {unit} per query"


class TuningRecord(BaseModel):
    """The provenance and the evidence of a tuned default pair cascade."""

    model_config = _FROZEN

    target: TuneTarget
    chosen: PlanPoint
    reason: str = Field(description="why this plan: the target it meets, or why FAISS alone is served")
    reranker_helps: bool = Field(
        description="whether the dense rerank of FAISS top M beats FAISS alone on dev queries (higher graded "
        "nDCG@10 against the truth); when it does not, FAISS alone is the default"
    )
    faiss_only: PlanPoint
    dense_rerank: PlanPoint
    oracle: dict[str, float] = Field(
        description="the dense model on every item: flops, and where measured (queries > 0) its quality"
    )
    front: tuple[PlanPoint, ...] = Field(
        description="the Pareto front of FLOPs against rel_ndcg over the eligible plans (none loses to FAISS alone "
        "on dev nDCG@10, none costs more than the dense model on every item), cheapest first"
    )
    gains_check: dict[str, object] | None = Field(
        None, description="recall@1 of the dense rerank on dev queries with the default gains and with [0, 0, 1]"
    )
    test: dict[str, dict[str, float]] | None = Field(
        None, description="the chosen plan, FAISS alone and the dense rerank on test queries (never tuned on)"
    )
    dev_queries: int
    split_rule: str
    models: dict[str, str] = Field(description="name -> version:sha256 prefix of every model the plans use")
    space: str
    date: str
    tuner: dict[str, float] = Field(description="plans measured, seconds spent")


def dev_check(record: TuningRecord) -> dict[str, object]:
    """Whether the reranker earns its place, as `bootstrap.json` and `GET /v1/space` show it: FAISS alone, the
    dense rerank and the default cascade on the dev queries, and why the default is what it is."""

    def row(p: PlanPoint) -> dict[str, object]:
        return {"plan": p.name, "recall_at_1": p.recall_at_1, "ndcg_at_10": p.ndcg, "flops": p.flops, "ms": p.ms}

    return {
        "dev_queries": record.dev_queries,
        "faiss_only": row(record.faiss_only),
        "dense_rerank": row(record.dense_rerank),
        "default_cascade": row(record.chosen),
        "reranker_helps": record.reranker_helps,
        "why": record.reason,
        "gains": None if record.gains_check is None else record.gains_check.get("verdict"),
        "tuned_at": record.date,
    }
