"""One stage of a cascade, and the check of a stage list against the variants that would run it: its own module,
so that the default cascade (`cascade.config`), the record of how it was tuned (`cascade.tuning_record`), the
snapshot (its default cascades, checked when it is built) and the query plan (a query's stages, checked once) all
name it without importing each other."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cascade.errors import RequestError
from models.aggregation import get_aggregator

__all__ = ["Stage", "ServedVariant", "check_stages"]


class Stage(BaseModel):
    """Score `samples` sampled members of every surviving cluster with `variant`, aggregate them with
    `aggregator`, and keep the best `keep` clusters (the last stage keeps the k asked for)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str = Field(min_length=1, max_length=64, description="registry name of an active model")
    samples: int = Field(ge=1, le=256, description="members sampled per cluster")
    keep: int | None = Field(None, ge=1, description="clusters kept for the next stage; ignored on the last")
    aggregator: str = Field("bayes", min_length=1, max_length=32)


class ServedVariant(Protocol):
    """What the check reads of a served variant (`cascade.snapshot.Variant`)."""

    @property
    def kind(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def gadget(self) -> Any: ...


def check_stages(
    stages: Sequence[Stage], variants: Mapping[str, ServedVariant], k: int, kind: str = "classifier"
) -> None:
    """That `variants` (a snapshot's, by name) can run `stages` for a target of this kind: every variant known
    and of that kind, every aggregator known and usable with it (a gadget's of the gadget's kind), every stage but
    the last keeping at least k clusters. Raises RequestError naming the field."""
    if not stages:
        raise RequestError("stages", "at least one stage is required")
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        variant = variants.get(stage.variant)
        if variant is None:
            known = ", ".join(sorted(variants))
            raise RequestError(f"{where}.variant", f"unknown variant {stage.variant!r}; active: {known}")
        if variant.kind != kind:
            fitting = ", ".join(sorted(n for n, v in variants.items() if v.kind == kind)) or "none"
            need = "pair models (a query by example)" if kind == "pair" else "classifiers (a label or utility)"
            raise RequestError(
                f"{where}.variant", f"{stage.variant!r} is a {variant.kind}; this target needs {need}: {fitting}"
            )
        try:
            agg = get_aggregator(stage.aggregator)
        except KeyError as exc:
            raise RequestError(f"{where}.aggregator", str(exc.args[0])) from None
        if agg.needs_gadget and variant.gadget is None:
            raise RequestError(f"{where}.aggregator", f"{stage.aggregator!r} needs a gadget; {variant.name} has none")
        stored = getattr(getattr(variant.gadget, "spec", None), "kind", None)
        if agg.needs_gadget and stored != stage.aggregator:
            raise RequestError(
                f"{where}.aggregator",
                f"{stage.aggregator!r} needs a gadget of that kind; {variant.name} has a {stored!r} gadget",
            )
        last = i == len(stages) - 1
        if not last and stage.keep is None:
            raise RequestError(f"{where}.keep", "every stage but the last must say how many clusters it keeps")
        if not last and stage.keep is not None and stage.keep < k:
            raise RequestError(f"{where}.keep", f"keeps {stage.keep} clusters, fewer than k={k}")
