"""One stage of a cascade: its own module, so that the default cascade (`cascade.config`) and the record of how
it was tuned (`cascade.tuning_record`) both name it without importing each other."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Stage"]


class Stage(BaseModel):
    """Score `samples` sampled members of every surviving cluster with `variant`, aggregate them with
    `aggregator`, and keep the best `keep` clusters (the last stage keeps the k asked for)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str = Field(min_length=1, max_length=64, description="registry name of an active model")
    samples: int = Field(ge=1, le=256, description="members sampled per cluster")
    keep: int | None = Field(None, ge=1, description="clusters kept for the next stage; ignored on the last")
    aggregator: str = Field("bayes", min_length=1, max_length=32)
