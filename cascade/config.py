"""A cascade is a list of stages; the default list is stored as JSON beside the space."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Stage", "CascadeConfig", "CONFIG_FILE"]

CONFIG_FILE = "cascade.json"


class Stage(BaseModel):
    """Score `samples` sampled members of every surviving cluster with `variant`, aggregate them with
    `aggregator`, and keep the best `keep` clusters (the last stage keeps the k asked for)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str = Field(min_length=1, max_length=64, description="registry name of an active model")
    samples: int = Field(ge=1, le=256, description="members sampled per cluster")
    keep: int | None = Field(None, ge=1, description="clusters kept for the next stage; ignored on the last")
    aggregator: str = Field("bayes", min_length=1, max_length=32)


class CascadeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: tuple[Stage, ...] = Field(min_length=1, max_length=8)
    dense: str = Field("dense", description="the dense model: the oracle and, by convention, the last stage")

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> CascadeConfig:
        return cls.model_validate_json(path.read_text())
