"""What is being served: models, the default cascade, the space."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter

from cascade.config import READER_RULE
from cascade.queries import default_gains
from cascade.reader import check_of, serves
from cascade.snapshot import CachedInputs, Snapshot, misfit
from cascade.tuning_record import dev_check
from models.cluster_reader_store import READER_PREVIOUS, stored_digest
from models.registry import RegistryError
from service.dependencies import SnapshotDep, StateDep
from service.errors import error_responses
from service.schemas import BrokenEntryOut, CascadeOut, ModelsOut, SpaceOut
from service.state import ServiceState

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/models", response_model=ModelsOut)
def list_models(state: StateDep) -> ModelsOut:
    """Every version of every registered model: `active` (the registry's choice on disk), `served` (whether the
    current snapshot answers queries with it) and, when it is not served, `not_served` saying why (inactive, does
    not fit the space, or activated on disk after the snapshot was built: `POST /v1/admin/reload`). An entry whose
    manifest on disk does not validate is listed with `broken` saying why (it cannot be activated). `broken` lists
    the active entries that could not be loaded (and the version served in their place)."""
    snapshot = state.snapshot
    faults = state.faults
    entries = state.registry.describe()
    for entry in entries:
        fault = faults.get(entry["name"])
        if fault is not None and fault.version == entry["version"] and "broken" not in entry:
            entry["broken"] = fault.error
        entry["served"], entry["not_served"] = _served(state, snapshot, entry)
    return ModelsOut(
        models=entries,
        broken=[BrokenEntryOut(**vars(f)) for _, f in sorted(faults.items())],
    )


def _served(state: ServiceState, snapshot: Snapshot | None, entry: dict) -> tuple[bool, str | None]:
    name, version = entry["name"], entry["version"]
    if "broken" in entry:
        return False, entry["broken"]
    if snapshot is None:
        return False, "the server is still loading its snapshot"
    variant = snapshot.variants.get(name)
    if variant is not None and variant.version == version:
        return True, None
    try:
        reason = misfit(state.registry.manifest(name, version), snapshot.space)
    except RegistryError as exc:
        return False, str(exc)
    if reason is not None:
        return False, f"does not fit the space: it {reason}"
    if not entry.get("active"):
        serving = f"; version {variant.version} is served" if variant is not None else ""
        return False, f"not the active version{serving}"
    return False, "activated on disk after the current snapshot was built: POST /v1/admin/reload to serve it"


@router.get("/cascade", response_model=CascadeOut, responses=error_responses(503))
def default_cascade(snapshot: SnapshotDep) -> CascadeOut:
    """The default cascades: `stages` (classifiers, for label and utility targets in mode cascade) and
    `pair_stages` (pair models, for queries by example, with stage 0's `pair_candidates`), with their dense models;
    `pair_tuning`: where the pair cascade was tuned, the target, its measured quality and cost, and the front."""
    config = snapshot.config
    return CascadeOut(
        stages=list(config.stages),
        dense=config.dense,
        pair_stages=None if config.pair_stages is None else list(config.pair_stages),
        pair_dense=config.pair_dense,
        pair_candidates=config.pair_candidates,
        pair_tuning=config.pair_tuning,
        reader=config.reader,
    )


@router.get("/space", response_model=SpaceOut, responses=error_responses(503))
def space_summary(snapshot: SnapshotDep, state: StateDep) -> SpaceOut:
    """What the space is: its source, its clusters, the held-out queries it ships, and the exact table's state."""
    space = snapshot.space
    sizes = space.sizes
    return SpaceOut(
        name=str(space.meta.get("id", "")),
        dataset=str(space.meta.get("dataset", "")),
        clusters=str(space.meta.get("clusters", "")),
        served=space.meta.get("served"),
        seen_by_models=space.meta.get("seen_by_models"),
        num_items=space.num_items,
        num_clusters=space.num_clusters,
        num_classes=space.num_classes,
        classes=[int(c) for c in space.labels_known],
        input_dim=space.input_dim,
        max_cluster_size=int(sizes.max()),
        cluster_sizes={"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        held_out_queries=0 if snapshot.queries is None else len(snapshot.queries),
        num_grades=snapshot.num_grades,
        grades=_grades(space.meta.get("grades"), snapshot.num_grades),
        exact=_finite(state.exact_status(snapshot)),
        reranker=None if snapshot.config.pair_tuning is None else dev_check(snapshot.config.pair_tuning),
        reader=_reader(snapshot, state.settings.space_dir),
        reader_training=None if state.reader_training is None else state.reader_training.status(),
        item_cache=[_cache_entry(e) for e in snapshot.item_cache.entries()],
        snapshot_id=snapshot.id,
    )


def _reader(snapshot: Snapshot, space_dir: Path) -> dict[str, Any] | None:
    """The stored cluster reader and its dev check; a check of another reader or space (or none) says it is not
    served."""
    stored = snapshot.reader
    if stored is None:
        return None
    out: dict[str, Any] = {
        "sha256": stored.sha256,
        "spec": stored.spec.to_dict(),
        "training": stored.extra,
        "previous": stored_digest(space_dir, READER_PREVIOUS),  # what POST /v1/admin/reader/rollback restores
    }
    choice = check_of(snapshot)
    if choice is None:
        recorded = snapshot.config.reader
        if recorded is not None and recorded.sha256 == stored.sha256 and recorded.rule != READER_RULE:
            why = f"checked under the ranking rule {recorded.rule or 'before rules'!r}, not {READER_RULE!r}"
        else:
            why = "not checked on this space's dev queries"
        return {**out, "served": False, "reason": f"{why} (prunecascade reader --check)"}
    return {**out, **_finite(choice.model_dump(mode="json")), "served": serves(snapshot)}


GRADE_NAMES = ("other", "same_label", "same_cluster")


def _grades(measured: dict | None, num_grades: int) -> dict | None:
    """What the relevance grades are: measured at bootstrap on a user's clusters, else (MNIST-1D prototypes,
    where a cluster is the views of one prototype) built in; null only without pair models."""
    if num_grades == 0:
        return None
    if measured:
        return measured
    names = list(GRADE_NAMES[:num_grades]) if num_grades <= 3 else [f"grade_{g}" for g in range(num_grades)]
    return {
        "num_grades": num_grades,
        "names": names,
        "gains": list(default_gains(num_grades)),
        "source": "built in: every cluster holds the views of one prototype (same_cluster) of one label",
    }


def _cache_entry(entry: CachedInputs) -> dict:
    key = entry.key.split("@")[0]  # the trunk's digest; the rest is a memory address
    return {
        "key": key,
        "bytes": entry.nbytes,
        "dtype": str(entry.table.dtype).removeprefix("torch."),
        "mapped": entry.mapped,  # a read-only map of a file every worker process shares
        "build_ms": round(entry.build_ms, 1),
        "build_flops": entry.build_flops,
    }


def _finite(status: dict) -> dict:
    """JSON has no Infinity: an unknown break-even (no cascade cost to compare) is reported as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in status.items()}
