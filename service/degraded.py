"""What a replica serves when registry entries on disk are broken (truncated weights, an ACTIVE naming a missing
version, a manifest that does not validate): every healthy model, the broken one's previous good version where
there is one, and default cascades shortened to the stages that can still run. One broken file on a shared
volume must not keep every replica from becoming ready; the faults are reported (`/v1/models`, the log, the
`prunecascade_registry_broken` metric) and the answers that a fallback changed say so (`warnings`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cascade.config import CascadeConfig, Stage
from cascade.snapshot import Variant
from models.aggregation import get_aggregator
from models.registry import ModelRegistry

__all__ = ["Fault", "fallback_versions", "servable_config"]


@dataclass(frozen=True)
class Fault:
    """An active registry entry that could not be loaded."""

    name: str
    version: int | None
    """None: ACTIVE itself does not read as a version number."""
    error: str
    served_version: int | None = None
    """The version served instead (its previous good one), or None."""

    def describe(self) -> str:
        ref = f"{self.name}:{self.version}" if self.version is not None else f"{self.name} (ACTIVE unreadable)"
        instead = (
            f"version {self.served_version} is served instead"
            if self.served_version is not None
            else "no version of it is served"
        )
        return f"{ref} is broken ({self.error}); {instead}"


def fallback_versions(registry: ModelRegistry, name: str, broken: int | None) -> list[int]:
    """Versions to try in place of a broken active one, best first: those activated before it (most recent
    first), then the remaining stored versions below it, newest first, then any above it."""
    existing = registry.versions(name)
    order = [v for v in reversed(registry.history(name)) if v in existing]
    below = sorted((v for v in existing if broken is None or v < broken), reverse=True)
    above = sorted((v for v in existing if broken is not None and v > broken), reverse=True)
    out: list[int] = []
    for v in [*order, *below, *above]:
        if v != broken and v not in out:
            out.append(v)
    return out


def _runs(stage: Stage, variants: Mapping[str, Variant], kind: str) -> bool:
    variant = variants.get(stage.variant)
    if variant is None or variant.kind != kind:
        return False
    try:
        aggregator = get_aggregator(stage.aggregator)
    except KeyError:
        return False
    if not aggregator.needs_gadget:
        return True
    return getattr(getattr(variant.gadget, "spec", None), "kind", None) == stage.aggregator


def _shortened(
    stages: tuple[Stage, ...], dense: str, variants: Mapping[str, Variant], kind: str
) -> tuple[Stage, ...] | None:
    """The stages that can still run, in order; the dense model alone if none can; None without the dense model."""
    if dense not in variants:
        return None
    if not stages:  # FAISS alone (a tuned default): no stage to cut
        return stages
    kept = tuple(s for s in stages if _runs(s, variants, kind))
    if kept:
        return kept
    return (Stage(variant=dense, samples=max(s.samples for s in stages)),)


def servable_config(
    config: CascadeConfig, variants: Mapping[str, Variant], faults: Mapping[str, Fault]
) -> tuple[CascadeConfig, dict[str, list[str]]]:
    """The configured default cascades cut down to what `variants` can run, and, per target kind (`classifier`,
    `pair`), the warnings an answer of that kind carries: a fallback version served in a default cascade, or a
    cascade shortened. Raises LookupError when the dense classifier itself cannot be served."""
    warnings: dict[str, list[str]] = {"classifier": [], "pair": []}
    stages = _shortened(config.stages, config.dense, variants, "classifier")
    if stages is None:
        why = faults[config.dense].describe() if config.dense in faults else f"{config.dense!r} is not served"
        raise LookupError(f"the dense classifier cannot be served: {why}")
    pair_stages, pair_dense = config.pair_stages, config.pair_dense
    if config.pair_stages is not None and config.pair_dense is not None:
        pair_stages = _shortened(config.pair_stages, config.pair_dense, variants, "pair")
        if pair_stages is None:
            pair_dense = None
            warnings["pair"].append(
                f"the dense pair model {config.pair_dense!r} cannot be served: FAISS alone answers queries by "
                "example (the bi-encoder's nearest clusters)"
            )
    for kind, before, after, dense in (
        ("classifier", config.stages, stages, config.dense),
        ("pair", config.pair_stages, pair_stages, config.pair_dense),
    ):
        if before is None:
            continue
        names = {s.variant for s in before} | {dense}
        warnings[kind] += [faults[n].describe() for n in sorted(names) if n in faults]
        if after is not None and after != before:
            warnings[kind].append(
                f"the default cascade runs {' -> '.join(s.variant for s in after)} instead of "
                f"{' -> '.join(s.variant for s in before)}"
            )
    served = config.model_copy(update={"stages": stages, "pair_stages": pair_stages, "pair_dense": pair_dense})
    return served, warnings
