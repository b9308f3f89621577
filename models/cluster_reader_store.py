"""A cluster reader on disk: safetensors weights and a JSON spec beside the space whose retriever it was trained
with (its residual is that retriever's score), written so that a reader of the directory never sees half of it.

The reader it replaced is kept beside it (`reader.previous.json` and its weights, with the dev check it was served
under) so that an operator can roll back to it; older ones are removed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from models.cluster_reader import ReaderRanker, ReaderSpec, build_ranker
from models.registry import sha256_file, write_atomic

__all__ = [
    "StoredReader",
    "save_reader",
    "store_reader_files",
    "rollback_reader",
    "load_reader",
    "stored_digest",
    "weights_file",
    "READER_SPEC",
    "READER_PREVIOUS",
]

READER_SPEC = "reader.json"
READER_PREVIOUS = "reader.previous.json"


@dataclass(frozen=True)
class StoredReader:
    ranker: ReaderRanker
    spec: ReaderSpec
    sha256: str  # of the weights: names the reader in the snapshot's id and its item table
    extra: dict[str, Any] = field(default_factory=dict)  # how it was trained


def weights_file(digest: str) -> str:
    """A reader's weights are named by their sha256, so a new reader never overwrites the one being served."""
    return f"reader-{digest[:16]}.safetensors"


def save_reader(
    ranker: ReaderRanker,
    spec: ReaderSpec,
    directory: Path,
    extra: dict[str, Any] | None = None,
    check: dict[str, Any] | None = None,
) -> str:
    """Store a reader as the current one (`_install`); `check` is the dev check the replaced reader was served under,
    kept with it for a rollback. Returns the sha256."""
    directory = Path(directory)
    tmp = directory / ".reader-weights.tmp"
    save_file({k: v.detach().contiguous().clone() for k, v in ranker.state_dict().items()}, str(tmp))
    digest = sha256_file(tmp)
    tmp.replace(directory / weights_file(digest))
    return _install(directory, {"spec": spec.to_dict(), "sha256": digest, "extra": extra or {}}, check)


def store_reader_files(
    directory: Path, spec: ReaderSpec, weights: bytes, extra: dict[str, Any], check: dict | None
) -> str:
    """Store an uploaded reader's exact bytes as the current one (`_install`). Returns the sha256."""
    directory = Path(directory)
    digest = hashlib.sha256(weights).hexdigest()
    tmp = directory / ".reader-weights.tmp"
    tmp.write_bytes(weights)
    tmp.replace(directory / weights_file(digest))
    return _install(directory, {"spec": spec.to_dict(), "sha256": digest, "extra": extra}, check)


def _write_json(path: Path, meta: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(meta, indent=2, allow_nan=False))


def _install(directory: Path, meta: dict[str, Any], check: dict[str, Any] | None) -> str:
    """The new weights are in place under their own name: the replaced spec is kept as the previous one (with the
    check it was served under), then the new spec naming the weights is renamed into place in one step, so a crash
    at any point leaves a whole reader served. Weight files neither spec names go last."""
    digest = meta["sha256"]
    meta = {**meta, "weights": weights_file(digest)}
    current = directory / READER_SPEC
    if current.exists() and stored_digest(directory) != digest:
        _write_json(directory / READER_PREVIOUS, {**json.loads(current.read_text()), "check": check})
    _write_json(current, meta)
    _remove_unnamed(directory)
    return digest


def _remove_unnamed(directory: Path) -> None:
    named = set()
    for spec in (READER_SPEC, READER_PREVIOUS):
        try:
            named.add(Path(json.loads((directory / spec).read_text())["weights"]).name)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for old in directory.glob("reader-*.safetensors"):
        if old.name not in named:
            old.unlink(missing_ok=True)


def rollback_reader(directory: Path, check: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """Make the previous reader current again and the current one previous (kept with `check`, the dev check it
    is served under). Returns the restored reader's sha256 and the check it was served under. LookupError when
    there is no previous reader; ValueError when its files are broken (nothing is changed then)."""
    directory = Path(directory)
    if not (directory / READER_PREVIOUS).exists():
        raise LookupError("there is no previous cluster reader to roll back to")
    load_reader(directory, READER_PREVIOUS)  # whole, or ValueError before anything moves
    previous = json.loads((directory / READER_PREVIOUS).read_text())
    restored_check = previous.pop("check", None)
    current = json.loads((directory / READER_SPEC).read_text())
    _write_json(directory / READER_SPEC, previous)  # the rollback takes effect in this one rename
    _write_json(directory / READER_PREVIOUS, {**current, "check": check})  # (a crash before it forgets `current`)
    return str(previous["sha256"]), restored_check


def stored_digest(directory: Path, which: str = READER_SPEC) -> str | None:
    """The sha256 the spec in `directory` names (`which`: the current one, or `READER_PREVIOUS`; not checked
    against the weights: `load_reader` does), or None without a spec or with one that names none: enough to tell
    whether the stored reader changed, or which one a rollback would restore."""
    try:
        digest = json.loads((Path(directory) / which).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


def load_reader(directory: Path, which: str = READER_SPEC) -> StoredReader | None:
    """The reader stored in `directory` (`which`: the current one, or `READER_PREVIOUS`), None when there is none.
    Raises ValueError naming the problem when the files do not match each other (a changed weight file, a spec
    edited by hand)."""
    directory = Path(directory)
    spec_file = directory / which
    if not spec_file.exists():
        return None
    try:
        meta = json.loads(spec_file.read_text())
        spec = ReaderSpec.from_dict(meta["spec"])
        expected, name = meta["sha256"], Path(meta["weights"]).name
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{spec_file}: not a cluster reader's spec ({exc})") from None
    weights = directory / name
    if not weights.exists() or sha256_file(weights) != expected:
        raise ValueError(f"{weights} does not match the sha256 in {spec_file}")
    ranker = build_ranker(spec)
    try:
        ranker.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights} does not fit its spec: {str(exc)[:300]}") from None
    return StoredReader(ranker.eval(), spec, expected, dict(meta.get("extra") or {}))
