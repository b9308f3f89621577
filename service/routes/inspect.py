"""Look inside the space: what a cluster holds, an item's vector, and the held-out queries by example that ship
with the space (so that a user can try the main path without writing code)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from service.dependencies import SnapshotDep

__all__ = ["router", "MAX_PAGE"]

router = APIRouter(prefix="/v1", tags=["space"])

MAX_PAGE = 1000


class HeldOutQuery(BaseModel):
    index: int
    cluster_id: int = Field(description="the query's own cluster (relevance grade 2)")
    label: int = Field(description="its label (clusters of this label have grade 1)")
    x: list[float] = Field(description="the query object: send it as target.examples[0]")


class QueriesOut(BaseModel):
    total: int
    offset: int
    queries: list[HeldOutQuery]


class ClusterOut(BaseModel):
    cluster_id: int
    size: int
    label: int = Field(description="the offline truth: the majority label of the members (never used to answer)")
    offset: int
    members: list[int] = Field(description="item ids of the members on this page")


class ItemOut(BaseModel):
    item_id: int
    cluster_id: int
    label: int
    x: list[float]


def _not_found(field: str, message: str) -> HTTPException:
    return HTTPException(404, [{"loc": ["path", field], "msg": message, "type": "not_found"}])


@router.get("/space/queries", response_model=QueriesOut, summary="Held-out queries by example, with their truth")
def held_out_queries(
    snapshot: SnapshotDep,
    offset: int = Query(0, ge=0, le=10**9),
    limit: int = Query(10, ge=1, le=MAX_PAGE),
) -> QueriesOut:
    """Fresh views of the space's prototypes (never one of its items), each with the cluster it belongs to."""
    queries = snapshot.queries
    if queries is None:
        return QueriesOut(total=0, offset=offset, queries=[])
    rows = range(offset, min(offset + limit, len(queries)))
    return QueriesOut(
        total=len(queries),
        offset=offset,
        queries=[
            HeldOutQuery(
                index=i,
                cluster_id=int(queries.cluster[i]),
                label=int(queries.label[i]),
                x=[float(v) for v in queries.x[i]],
            )
            for i in rows
        ],
    )


@router.get("/clusters/{cluster_id}", response_model=ClusterOut, summary="A cluster's members")
def cluster(
    snapshot: SnapshotDep,
    cluster_id: int,
    offset: int = Query(0, ge=0, le=10**9),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
) -> ClusterOut:
    space = snapshot.space
    if not 0 <= cluster_id < space.num_clusters:
        raise _not_found("cluster_id", f"no cluster {cluster_id}; clusters are 0..{space.num_clusters - 1}")
    start, end = int(space.offsets[cluster_id]), int(space.offsets[cluster_id + 1])
    first = min(start + offset, end)
    return ClusterOut(
        cluster_id=cluster_id,
        size=end - start,
        label=int(space.cluster_labels[cluster_id]),
        offset=offset,
        members=list(range(first, min(first + limit, end))),
    )


@router.get("/items/{item_id}", response_model=ItemOut, summary="An item's vector")
def item(snapshot: SnapshotDep, item_id: int) -> ItemOut:
    space = snapshot.space
    if not 0 <= item_id < space.num_items:
        raise _not_found("item_id", f"no item {item_id}; items are 0..{space.num_items - 1}")
    cluster_id = int(space.offsets.searchsorted(item_id, side="right") - 1)
    return ItemOut(
        item_id=item_id,
        cluster_id=cluster_id,
        label=int(space.labels[item_id]),
        x=[float(v) for v in space.features[item_id]],
    )
