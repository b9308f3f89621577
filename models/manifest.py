"""The manifest of a registry entry: what the weights are, where they came from and what they cost."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.pair import PairSpec
from models.spec import NetworkSpec

__all__ = ["Manifest", "NAME_PATTERN", "utc_now", "MAX_EXTRA_BYTES"]

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
MAX_EXTRA_BYTES = 65_536
_INT64 = 2**63 - 1


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Manifest(BaseModel):
    # Finite numbers everywhere: a NaN or Infinity would be stored as null and break every later read.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1, le=2**31 - 1)
    spec: dict[str, Any]
    parent: str | None = Field(
        None, max_length=200, description="`name:version` of the dense parent; null for a dense model"
    )
    method: str = Field("dense", max_length=200)
    keep: float = Field(1.0, gt=0.0, le=1.0)
    dataset: str = Field("", max_length=1000)
    flops_dense_kernel: int = Field(ge=0, le=_INT64)
    flops_nonzero: int = Field(ge=0, le=_INT64)
    accuracy: float = Field(ge=0.0, le=1.0)
    output_deviation: float = Field(0.0, ge=0.0)
    output_deviation_p95: float = Field(0.0, ge=0.0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: str = Field(default_factory=utc_now, max_length=64)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra")
    @classmethod
    def _extra_is_finite_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Free-form, but plain finite JSON of bounded size (NaN/Infinity would not round-trip)."""
        try:
            text = json.dumps(value, allow_nan=False, default=str)
        except (ValueError, TypeError, RecursionError) as exc:
            raise ValueError(f"must be finite JSON (no NaN or Infinity): {str(exc)[:100]}") from None
        if len(text) > MAX_EXTRA_BYTES:
            raise ValueError(f"at most {MAX_EXTRA_BYTES} bytes of JSON, got {len(text)}")
        return value

    @field_validator("spec")
    @classmethod
    def _spec_builds(cls, value: dict[str, Any]) -> dict[str, Any]:
        # the spec's "kind" says which model it is ("pair": a cross-encoder, else a classifier)
        if value.get("kind") == "pair":
            PairSpec.from_dict(value)
        else:
            NetworkSpec.from_dict(value)  # raises ValueError naming the problem
        return value

    @property
    def model_kind(self) -> str:
        """`pair` (cross-encoder, models/pair.py) or `classifier`."""
        return "pair" if self.spec.get("kind") == "pair" else "classifier"

    @property
    def pair_spec(self) -> PairSpec:
        if self.model_kind != "pair":
            raise TypeError(f"{self.ref} is a classifier, not a pair model")
        return PairSpec.from_dict(self.spec)

    @property
    def model_spec(self) -> NetworkSpec | PairSpec:
        """The spec of either kind (`NetworkSpec` for a classifier, `PairSpec` for a pair model)."""
        return self.pair_spec if self.model_kind == "pair" else self.network_spec

    @property
    def network_spec(self) -> NetworkSpec:
        """A classifier's spec; for a pair model, the spec of its prunable scorer."""
        if self.model_kind == "pair":
            return PairSpec.from_dict(self.spec).scorer
        return NetworkSpec.from_dict(self.spec)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"
