"""What is being served: models, the default cascade, the space."""

from __future__ import annotations

from fastapi import APIRouter

from service.dependencies import SnapshotDep, StateDep
from service.errors import error_responses
from service.schemas import CascadeOut, ModelsOut, SpaceOut

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/models", response_model=ModelsOut)
def list_models(state: StateDep) -> ModelsOut:
    """Every version of every registered model, with the active one marked; an entry whose manifest on disk
    does not validate is listed with `broken` saying why (it cannot be activated)."""
    return ModelsOut(models=state.registry.describe())


@router.get("/cascade", response_model=CascadeOut, responses=error_responses(503))
def default_cascade(snapshot: SnapshotDep) -> CascadeOut:
    return CascadeOut(stages=list(snapshot.config.stages), dense=snapshot.config.dense)


@router.get("/space", response_model=SpaceOut, responses=error_responses(503))
def space_summary(snapshot: SnapshotDep) -> SpaceOut:
    space = snapshot.space
    return SpaceOut(
        name=str(space.meta.get("id", "")),
        num_items=space.num_items,
        num_clusters=space.num_clusters,
        num_classes=space.num_classes,
        input_dim=space.input_dim,
        max_cluster_size=int(space.sizes.max()),
        snapshot_id=snapshot.id,
    )
