"""Operators replace the served cluster reader over HTTP (`POST /v1/admin/reader`) and roll back to the one it
replaced (`POST /v1/admin/reader/rollback`), as they do pair and classifier models in the registry.

An upload is read and checked completely before anything is written: its spec must describe a reader of the
retriever this space serves (its residual is that retriever's score) and of the space's items, its weights must be
safetensors that fit the spec and give finite scores, and then its dev check (`cascade.reader_gate`, the same as
`prunecascade reader --check`) must choose it over FAISS alone and the default pair cascade. Only then are its files
stored beside the space, the replaced reader kept as the previous one with the check it was served under, and a
complete snapshot swapped in. A refused upload leaves the served reader and its files as they were."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
from safetensors.torch import load as load_safetensors

from cascade.config import ReaderChoice
from cascade.reader import check_of
from cascade.snapshot import Snapshot
from models.cluster_reader import ReaderSpec, build_ranker
from models.cluster_reader_store import StoredReader, rollback_reader, store_reader_files
from service.checkpoints import UploadError, refuse_oversized
from service.state import ConflictError, ServiceState

__all__ = ["read_upload", "install_upload", "roll_back"]

PROBE_ITEMS = 4


def read_upload(spec: bytes, weights: bytes, snapshot: Snapshot) -> StoredReader:
    """The uploaded reader, loaded in memory and probed, or UploadError (422) naming the field and the problem.
    `spec` is a reader.json as `prunecascade reader` writes it, or only its "spec" object."""
    try:
        meta = json.loads(spec)
    except ValueError:
        raise UploadError(422, "spec", "not JSON") from None
    if not isinstance(meta, dict):
        raise UploadError(422, "spec", "not a JSON object")
    body = meta.get("spec", meta)
    try:
        reader_spec = ReaderSpec.from_dict(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise UploadError(422, "spec", f"not a cluster reader's spec ({exc})") from None
    embedding = snapshot.embedding
    if embedding is None:
        raise UploadError(422, "spec", "this space has no retriever (bi-encoder), so no reader can be served on it")
    if reader_spec.encoder != embedding.encoder.spec.to_dict():
        raise UploadError(
            422, "spec.encoder", "the reader was built on another retriever than the one this space serves"
        )
    if reader_spec.input_dim != snapshot.space.input_dim:
        raise UploadError(
            422, "spec", f"the reader reads {reader_spec.input_dim} features; the items have {snapshot.space.input_dim}"
        )
    digest = hashlib.sha256(weights).hexdigest()
    if "sha256" in meta and meta["sha256"] != digest:
        raise UploadError(422, "weights", f"their sha256 is {digest}, the spec names {meta['sha256']}")
    try:
        tensors = load_safetensors(weights)
    except Exception:  # whatever the parser says, these are not safetensors weights
        raise UploadError(422, "weights", "not a safetensors file (pickles are refused)") from None
    ranker = build_ranker(reader_spec)
    try:
        ranker.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise UploadError(422, "weights", f"they do not fit the spec: {str(exc)[:300]}") from None
    ranker.eval()
    x = torch.from_numpy(snapshot.space.features[:PROBE_ITEMS].astype("float32"))
    with torch.inference_mode():
        table = ranker.item_table(x)
        keys = ranker.query_keys(x[:1], table[None], torch.zeros(1))
    if not (torch.isfinite(table).all() and torch.isfinite(keys).all()):
        raise UploadError(422, "weights", "the reader's scores of the space's first items are not finite")
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    return StoredReader(ranker, reader_spec, digest, {**extra, "uploaded": True})


def _kept_check(snapshot: Snapshot) -> dict | None:
    """The dev check the served reader is served under, to keep with it when it is replaced."""
    choice = check_of(snapshot)
    return choice.model_dump(mode="json") if choice is not None else None


def install_upload(state: ServiceState, spec: bytes, weights: bytes) -> tuple[ReaderChoice, Snapshot, bool]:
    """Read, check and serve an uploaded reader (module docstring). Returns its check, the snapshot serving it,
    and whether it is new (False: the same weights are served already; nothing changed)."""
    from cascade.reader_gate import check_reader  # measurement on dev queries, as the admin tuning route runs

    refuse_oversized((("spec", spec), ("weights", weights)), state.settings.max_upload_bytes)
    with state.lock:  # one change at a time: no model swap between the check and the swap
        snapshot = state.require_snapshot()
        stored = read_upload(spec, weights, snapshot)
        served = snapshot.reader
        if served is not None and served.sha256 == stored.sha256 and (choice := check_of(snapshot)) is not None:
            return choice, snapshot, False
        before = snapshot.config.reader
        widths = {} if before is None else {"candidates": before.candidates, "members": before.members}
        try:
            choice = check_reader(
                dataclasses.replace(snapshot, reader=stored),
                pool=before.pool if before else None,
                confidence=state.settings.reader_confidence,
                **widths,
            )
        except ValueError as exc:  # the space cannot check a reader (no or too few dev queries): nothing is stored
            raise ConflictError(f"the uploaded reader cannot be checked on this space: {exc}") from None
        if not choice.served:
            raise UploadError(422, "weights", f"the reader's dev check keeps what is served: {choice.reason}")
        store_reader_files(state.settings.space_dir, stored.spec, weights, stored.extra, _kept_check(snapshot))
        return choice, state.serve_reader(choice), True


def roll_back(state: ServiceState) -> Snapshot:
    """Serve the previous reader again, under the check it was served under (none kept: not served by default
    until `prunecascade reader --check`); the current one becomes the previous. ConflictError when there is none
    or its files are broken."""
    with state.lock:
        snapshot = state.require_snapshot()
        try:
            _, restored = rollback_reader(state.settings.space_dir, _kept_check(snapshot))
        except LookupError as exc:
            raise ConflictError(str(exc)) from None
        except ValueError as exc:
            raise ConflictError(f"the previous cluster reader cannot be served: {exc}") from None
        try:
            choice = ReaderChoice.model_validate(restored) if restored is not None else None
        except ValueError:
            choice = None  # a check that no longer reads is no check: the reader waits for a new one
        return state.serve_reader(choice)
