"""Look inside the space: what a cluster holds, an item's vector, and the held-out queries by example that ship
with the space (so that a user can try the main path without writing code)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, Field

from service.dependencies import SnapshotDep
from service.errors import error_responses
from service.schemas import PlainInt

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
    cluster_id: int = Field(description="the cluster's own id (the data's cluster column, else its number)")
    size: int
    label: int = Field(description="the offline truth: the majority label of the members (never used to answer)")
    offset: int
    members: list[int] = Field(description="item ids of the members on this page (GET /v1/items/{item_id})")
    purity: float | None = Field(None, description="the share of members that carry the majority label")
    seen_by_models: str | None = Field(
        None,
        description="the split the cluster went to when the models were trained: train, validation, test, or pool "
        "(no model saw it; held-out queries come from these); null where the space is only unseen items",
    )


class ItemOut(BaseModel):
    item_id: int = Field(description="the item's own id (the data's id column, else its row in the space)")
    cluster_id: int
    label: int
    x: list[float]


def _not_found(field: str, message: str) -> HTTPException:
    """In the shared error shape (service.errors keeps these items as they are), `loc` naming the path part."""
    return HTTPException(404, [{"loc": ["path", field], "msg": message, "type": "not_found"}])


def _known(ids: np.ndarray, what: str) -> str:
    """A short description of the ids that exist, for a 404 that helps find the right one."""
    if len(ids) <= 5:
        return f"{what} are {', '.join(str(int(i)) for i in ids)}"
    if int(ids[-1]) - int(ids[0]) == len(ids) - 1 and bool((np.diff(ids) == 1).all()):
        return f"{what} are {int(ids[0])}..{int(ids[-1])}"
    first = ", ".join(str(int(i)) for i in ids[:3])
    return f"{len(ids)} {what} from {int(ids.min())} to {int(ids.max())}, e.g. {first}"


@router.get(
    "/space/queries",
    response_model=QueriesOut,
    summary="Held-out queries by example, with their truth",
    responses=error_responses(503),
)
def held_out_queries(
    snapshot: SnapshotDep,
    offset: int = Query(0, ge=0, le=10**9),
    limit: int = Query(10, ge=1, le=MAX_PAGE),
) -> QueriesOut:
    """Fresh views of the space's prototypes (never one of its items), each with the cluster it belongs to."""
    queries = snapshot.queries
    if queries is None:
        return QueriesOut(total=0, offset=offset, queries=[])
    space = snapshot.space
    rows = range(offset, min(offset + limit, len(queries)))
    return QueriesOut(
        total=len(queries),
        offset=offset,
        queries=[
            HeldOutQuery(
                index=i,
                cluster_id=int(space.cluster_ids[int(queries.cluster[i])]),  # type: ignore[index]
                label=int(space.class_labels[int(queries.label[i])]),  # type: ignore[index]
                x=[float(v) for v in queries.x[i]],
            )
            for i in rows
        ],
    )


@router.get(
    "/clusters/{cluster_id}",
    response_model=ClusterOut,
    summary="A cluster's members",
    responses=error_responses(404, 503),
)
def cluster(
    snapshot: SnapshotDep,
    cluster_id: Annotated[
        PlainInt, Path(description="the cluster's own id, as query answers give it", ge=-(2**63), lt=2**63)
    ],
    offset: int = Query(0, ge=0, le=10**9),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
) -> ClusterOut:
    """The cluster's size, its majority label and a page of its members' item ids."""
    space = snapshot.space
    c = space.cluster_of(cluster_id)
    if c is None:
        known = _known(space.cluster_ids, "cluster ids")  # type: ignore[arg-type]
        raise _not_found("cluster_id", f"no cluster {cluster_id}; {known}{_why_absent(space.meta)}")
    start, end = int(space.offsets[c]), int(space.offsets[c + 1])
    first = min(start + offset, end)
    majority = int(space.cluster_labels[c])
    return ClusterOut(
        cluster_id=cluster_id,
        size=end - start,
        label=int(space.class_labels[majority]),  # type: ignore[index]
        offset=offset,
        members=[int(i) for i in space.item_ids[first : min(first + limit, end)]],  # type: ignore[index]
        purity=float((space.labels[start:end] == majority).mean()),
        seen_by_models=space.part_of(c),
    )


def _why_absent(meta: dict) -> str:
    """Where a cluster of the user's data may be that the space does not hold (nothing to add otherwise)."""
    if meta.get("space_dataset"):
        return f". The space is the file {meta['space_dataset']}; clusters of the training file are not served"
    if meta.get("split") == "clusters" and "seen_by_models" not in meta:
        return (
            ". This space holds only the clusters no model was trained on (it was built before every cluster was "
            "served): bootstrap a new home to serve them all"
        )
    return ""


@router.get("/items/{item_id}", response_model=ItemOut, summary="An item's vector", responses=error_responses(404, 503))
def item(
    snapshot: SnapshotDep,
    item_id: Annotated[
        PlainInt, Path(description="the item's own id, as a cluster's members list it", ge=-(2**63), lt=2**63)
    ],
) -> ItemOut:
    """The item's features (send them as `target.examples[0]` to query by example), its cluster and label."""
    space = snapshot.space
    row = space.item_of(item_id)
    if row is None:
        raise _not_found("item_id", f"no item {item_id}; {_known(space.item_ids, 'item ids')}")  # type: ignore[arg-type]
    c = int(space.offsets.searchsorted(row, side="right") - 1)
    return ItemOut(
        item_id=item_id,
        cluster_id=int(space.cluster_ids[c]),  # type: ignore[index]
        label=int(space.class_labels[int(space.labels[row])]),  # type: ignore[index]
        x=[float(v) for v in space.features[row]],
    )
