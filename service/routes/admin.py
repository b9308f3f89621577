"""Operator routes (bearer token): upload a checkpoint as an inactive version, activate, roll back, delete
a version, replace the default cascade, upload or roll back the cluster reader, reload what the command line
changed on disk. Each change is complete or not applied at all (see ServiceState)."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Body, Depends, File, Path, Response
from pydantic import Field

from cascade.config import CascadeConfig
from cascade.reader import check_of, serves
from cascade.snapshot import Snapshot
from models.manifest import NAME_PATTERN
from models.registry import KindMismatchError
from service.auth import require_admin
from service.checkpoints import GatePolicy, UploadError, load_probe, refuse_oversized, validate_upload
from service.dependencies import SnapshotDep, StateDep, current_snapshot
from service.errors import error_responses
from service.reader_admin import install_upload, roll_back
from service.schemas import ActivateRequest, AdminStateOut, PlainInt, ReaderAdminOut, UploadOut
from service.state import ServiceState

__all__ = ["router"]

# Auth first (401/403 before anything else), then the snapshot (503 while loading).
router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin), Depends(current_snapshot)],
    responses=error_responses(401, 403, 503),
)

Name = Annotated[str, Path(pattern=NAME_PATTERN, description="registry name of the model")]
Version = Annotated[PlainInt, Path(ge=1, le=2**31 - 1)]


def _state_out(state: ServiceState, snapshot: Snapshot) -> AdminStateOut:
    return AdminStateOut(
        snapshot_id=snapshot.id,
        active=state.active,
        served={v.name: v.version for v in snapshot.variants.values()},
    )


@router.post(
    "/models",
    status_code=201,
    response_model=UploadOut,
    responses={
        200: {"model": UploadOut, "description": "identical bytes were uploaded before: that version, unchanged"},
        **error_responses(413, 415, 422),
    },
)
def upload_model(
    state: StateDep,
    snapshot: SnapshotDep,
    response: Response,
    manifest: Annotated[bytes, File(description="manifest.json of the entry")],
    weights: Annotated[bytes, File(description="weights.safetensors (pickles are refused)")],
    gadget: Annotated[bytes | None, File(description="gadget.safetensors, when the variant has one")] = None,
    gadget_spec: Annotated[bytes | None, File(description="gadget.json, required with a gadget")] = None,
) -> UploadOut:
    """Validated completely before anything is written; stored as the next, inactive version (201). The same
    weights (and gadget) as a stored version of that name answer 200 with that version; nothing is stored."""
    settings = state.settings
    policy = GatePolicy(
        settings.accuracy_floor,
        settings.max_accuracy_drop,
        settings.flops_tolerance,
        relative_accuracy_floor=settings.relative_accuracy_floor,
        max_params=settings.max_params,
    )
    try:
        parts = (("manifest", manifest), ("weights", weights), ("gadget", gadget), ("gadget_spec", gadget_spec))
        refuse_oversized(parts, settings.max_upload_bytes)
        upload = validate_upload(
            manifest,
            weights,
            gadget,
            gadget_spec,
            snapshot,
            load_probe(settings.space_dir),
            policy,
            stored_kind=state.registry.kind_of,
        )
        gadget_sha = hashlib.sha256(gadget).hexdigest() if gadget is not None else None
        try:
            stored, created = state.registry.store_upload(upload.name, upload.files, upload.fields, gadget_sha)
        except KindMismatchError as exc:  # another kind stored under the name since the check above
            raise UploadError(422, "manifest.name", str(exc)) from None
    except UploadError:
        state.metrics.uploads.labels(outcome="refused").inc()
        raise
    except Exception:
        state.metrics.uploads.labels(outcome="error").inc()  # a bug, not the upload's fault: still counted
        raise
    state.metrics.uploads.labels(outcome="stored" if created else "identical").inc()
    if not created:
        response.status_code = 200
    return UploadOut(
        name=stored.name,
        version=stored.version,
        sha256=stored.sha256,
        flops_dense_kernel=stored.flops_dense_kernel,
        flops_nonzero=stored.flops_nonzero,
        accuracy=stored.accuracy,
        active=state.active.get(stored.name) == stored.version,
    )


@router.post(
    "/models/{name}/activate", response_model=AdminStateOut, responses=error_responses(404, 409, 413, 415, 422)
)
def activate_model(
    state: StateDep, name: Name, request: Annotated[ActivateRequest | None, Body()] = None
) -> AdminStateOut:
    """Activate `version` (default: the newest) once a complete snapshot with it has been built."""
    snapshot = state.activate(name, request.version if request is not None else None)
    return _state_out(state, snapshot)


@router.post("/models/{name}/rollback", response_model=AdminStateOut, responses=error_responses(404, 409, 422))
def rollback_model(state: StateDep, name: Name) -> AdminStateOut:
    """Back to the version active before the current one."""
    return _state_out(state, state.rollback(name))


@router.delete("/models/{name}/versions/{version}", status_code=204, responses=error_responses(404, 409, 422))
def delete_version(state: StateDep, name: Name, version: Version) -> Response:
    """Refused (409) for the active version."""
    state.delete(name, version)
    return Response(status_code=204)


@router.put("/cascade", response_model=AdminStateOut, responses=error_responses(413, 415, 422))
def put_cascade(state: StateDep, config: CascadeConfig) -> AdminStateOut:
    """The new default stage list, validated against the active models before it is stored."""
    return _state_out(state, state.set_cascade(config))


def _reader_out(snapshot: Snapshot) -> ReaderAdminOut:
    stored = snapshot.reader
    return ReaderAdminOut(
        snapshot_id=snapshot.id,
        sha256=stored.sha256 if stored is not None else None,
        served=serves(snapshot),
        check=check_of(snapshot),
    )


@router.post(
    "/reader",
    status_code=201,
    response_model=ReaderAdminOut,
    responses={
        200: {"model": ReaderAdminOut, "description": "the same weights are served already: nothing changed"},
        **error_responses(409, 413, 422),
    },
)
def upload_reader(
    state: StateDep,
    response: Response,
    spec: Annotated[bytes, File(description="reader.json as `prunecascade reader` writes it (or its `spec`)")],
    weights: Annotated[bytes, File(description="the reader's weights, safetensors (pickles are refused)")],
) -> ReaderAdminOut:
    """Serve an uploaded cluster reader once it is read whole, fits this space's retriever and items, and its dev
    check (as `prunecascade reader --check`, seconds on the default space) chooses it over FAISS alone and the
    default pair cascade; 422 with the check's figures otherwise, 409 where the space has no dev queries to check
    it on, and nothing changes. The reader it replaces is kept for `POST /v1/admin/reader/rollback`."""
    try:
        _, snapshot, created = install_upload(state, spec, weights)
    except UploadError:
        state.metrics.uploads.labels(outcome="refused").inc()
        raise
    state.metrics.uploads.labels(outcome="stored" if created else "identical").inc()
    if not created:
        response.status_code = 200
    return _reader_out(snapshot)


@router.post("/reader/rollback", response_model=ReaderAdminOut, responses=error_responses(409))
def rollback_reader(state: StateDep) -> ReaderAdminOut:
    """Back to the cluster reader the current one replaced, under the dev check it was served under (409 when there
    is none); the current one becomes the one to roll back to."""
    return _reader_out(roll_back(state))


class ReloadOut(AdminStateOut):
    changed: list[str] = Field(
        description="what the reload adopted: `name:version` for every newly active version, `cascade` for a new "
        "default cascade, `reader` for another cluster reader (or none); empty when the disk held nothing new"
    )


@router.post("/reload", response_model=ReloadOut, responses=error_responses(409, 422))
def reload_registry(state: StateDep) -> ReloadOut:
    """Serve what the command line changed in this home while the server ran (for example `prunecascade prune
    --home HOME ...`, which registers and activates a new version, `prunecascade train`, or `prunecascade reader`,
    which stores a cluster reader and its dev check): the active versions, the default cascade and the reader are
    read from disk and swapped in as one complete snapshot (a new reader that does not load is logged, and the one
    being served stays).
    Active models that do not fit the space are left out and logged once; `GET /v1/models` says why."""
    snapshot, changed = state.reload()
    return ReloadOut(**_state_out(state, snapshot).model_dump(), changed=changed)


@router.get("/state", response_model=AdminStateOut)
def admin_state(state: StateDep, snapshot: SnapshotDep) -> AdminStateOut:
    """The active version of every model, and the versions the current snapshot serves (those that fit the
    space); `snapshot_id` is the one every answer names."""
    return _state_out(state, snapshot)
