"""A cascade is a list of stages; the default list is stored as JSON beside the space."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cascade.stage import Stage
from cascade.tuning_record import TuningRecord
from models.calibration import TEMPERATURES

__all__ = [
    "Stage",
    "CascadeConfig",
    "ReaderChoice",
    "CONFIG_FILE",
    "scale_keeps",
    "READER_CANDIDATES",
    "READER_MEMBERS",
    "READER_POOL",
    "READER_RULE",
    "READER_CONFIDENCE",
]

READER_CANDIDATES = 10
"""FAISS's top clusters the cluster reader reorders unless its dev check says otherwise: at 10 it keeps the recall@1
of reading the top 50 at a fifth of the cost (lab/CLUSTER_READER.md, session 9)."""
READER_MEMBERS = 10
"""Members it reads per cluster (a uniform sample of larger clusters): all of a default cluster's."""
READER_POOL = 30
"""FAISS's top clusters a reader's answer ranks by expected gain: the first `candidates` are read, the rest are ranked
by the posterior of their label alone. On dev, nDCG@10 by pool 10 / 20 / 30 / 50: 0.930 / 0.953 / 0.955 / 0.955 on
the default space, 0.913 / 0.951 / 0.958 / 0.961 on digits (docs/performance.md section 0); it costs no model call."""
READER_RULE = "expected-gain-1"
"""The ranking rule a reader's answers follow (`cascade.reader`); a dev check made under another rule does not apply
to them, so a reader checked before the rule changed is not served until it is checked again."""

READER_CONFIDENCE = 0.95
"""How sure the dev check must be that the reader answers more dev queries better than worse, by recall@1 or by
nDCG@10, than each method it would replace (`cascade.reader_gate`: a one-sided sign test per metric): a reader that
serves costs about 40x FAISS's FLOPs per query, and 250 dev queries measure recall@1 to about 0.03, so a small gain
on them is no evidence."""

CONFIG_FILE = "cascade.json"


class ReaderChoice(BaseModel):
    """Whether the cluster reader answers queries by example by default, and why: it reranks FAISS's top
    `candidates` clusters reading `members` members of each, and is served only where it beat FAISS alone on dev
    queries (`cascade.reader_gate`). `sha256` names the reader that was measured and `space` the space: another
    reader, or the same one over another space of the home, is not served until it is measured there too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served: bool
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    space: str = Field("", max_length=200, description="the id of the space whose dev queries it was checked on")
    candidates: int = Field(READER_CANDIDATES, ge=1, le=1000)
    members: int = Field(READER_MEMBERS, ge=1, le=256)
    pool: int = Field(READER_POOL, ge=1, le=1000, description="FAISS's top clusters ranked by expected gain")
    temperature: float = Field(
        1.0,
        ge=TEMPERATURES[0],
        le=TEMPERATURES[1],
        description="divides the reader's keys before the softmax over the clusters it read, "
        "fitted on the dev queries (their own cluster's negative log-likelihood)",
    )
    rule: str = Field("", max_length=64, description="the ranking rule it measured (empty: a check made before rules)")
    confidence: float = Field(
        0.5,
        ge=0.5,
        lt=1.0,
        description="how sure the check had to be that the reader answers more dev queries better than worse "
        "(`READER_CONFIDENCE`; a check recorded without it compared the means only: 0.5)",
    )
    reason: str = Field("", max_length=2000)
    dev: dict[str, Any] = Field(default_factory=dict, description="FAISS alone and the reader on the dev queries")


class CascadeConfig(BaseModel):
    """One default cascade per kind of scorer: classifiers (label and utility targets) and pair models
    (queries by example). Default `keep`s are tuned for k = `reference_k`; a larger k scales them up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: tuple[Stage, ...] = Field(min_length=1, max_length=8)
    dense: str = Field("dense", description="the dense model: the oracle and, by convention, the last stage")
    pair_stages: tuple[Stage, ...] | None = Field(
        None,
        max_length=8,
        description="the default cascade of pair models (queries by example); [] answers from FAISS alone",
    )
    pair_dense: str | None = Field(None, description="the dense pair model: the oracle of queries by example")
    pair_candidates: int | None = Field(
        None, ge=1, description="stage 0's M for the default pair cascade (None: the server's example_candidates)"
    )
    pair_tuning: TuningRecord | None = Field(
        None, description="how the default pair cascade was chosen (prunecascade tune): target, front, provenance"
    )
    reference_k: int = Field(10, ge=1, description="the k the default keeps are tuned for")
    reader: ReaderChoice | None = Field(
        None, description="the cluster reader's dev check: served by default for queries by example, or why not"
    )

    def stages_for(self, kind: str) -> tuple[Stage, ...]:
        if kind == "pair":
            if self.pair_stages is None:
                raise LookupError("no default cascade of pair models is configured")
            return self.pair_stages
        return self.stages

    def dense_for(self, kind: str) -> str:
        if kind == "pair":
            if self.pair_dense is None:
                raise LookupError("no dense pair model is configured")
            return self.pair_dense
        return self.dense

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> CascadeConfig:
        return cls.model_validate_json(path.read_text())


def scale_keeps(stages: tuple[Stage, ...], k: int, reference_k: int) -> tuple[Stage, ...]:
    """The default cascade for a k above the one its keeps were tuned for: every keep grows by k / reference_k
    (rounded up), so that any k up to the service's maximum works without the user naming a stage."""
    if k <= reference_k:
        return stages
    factor = k / reference_k
    return tuple(
        s if s.keep is None else s.model_copy(update={"keep": max(k, math.ceil(s.keep * factor))}) for s in stages
    )
