"""A cluster reader on disk: safetensors weights and a JSON spec beside the space whose retriever it was trained
with (its residual is that retriever's score), written so that a reader of the directory never sees half of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from models.cluster_reader import ReaderRanker, ReaderSpec, build_ranker
from models.registry import sha256_file

__all__ = ["StoredReader", "save_reader", "load_reader", "stored_digest", "weights_file", "READER_SPEC"]

READER_SPEC = "reader.json"


@dataclass(frozen=True)
class StoredReader:
    ranker: ReaderRanker
    spec: ReaderSpec
    sha256: str  # of the weights: names the reader in the snapshot's id and its item table
    extra: dict[str, Any] = field(default_factory=dict)  # how it was trained


def weights_file(digest: str) -> str:
    """A reader's weights are named by their sha256, so a new reader never overwrites the one being served."""
    return f"reader-{digest[:16]}.safetensors"


def save_reader(ranker: ReaderRanker, spec: ReaderSpec, directory: Path, extra: dict[str, Any] | None = None) -> str:
    """The new weights under their own name, then the spec naming them and their sha256, renamed into place in one
    step: a crash at any point leaves the previous reader whole and served. Older weight files go last. Returns
    the sha256."""
    directory = Path(directory)
    tmp = directory / ".reader-weights.tmp"
    save_file({k: v.detach().contiguous().clone() for k, v in ranker.state_dict().items()}, str(tmp))
    digest = sha256_file(tmp)
    name = weights_file(digest)
    tmp.replace(directory / name)
    meta = {"spec": spec.to_dict(), "sha256": digest, "weights": name, "extra": extra or {}}
    spec_tmp = directory / f".{READER_SPEC}.tmp"
    spec_tmp.write_text(json.dumps(meta, indent=2, allow_nan=False))
    spec_tmp.replace(directory / READER_SPEC)
    for old in directory.glob("reader-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return digest


def stored_digest(directory: Path) -> str | None:
    """The sha256 the spec in `directory` names (not checked against the weights: `load_reader` does), or None
    without a spec or with one that names none: enough to tell whether the stored reader changed."""
    try:
        digest = json.loads((Path(directory) / READER_SPEC).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


def load_reader(directory: Path) -> StoredReader | None:
    """The reader stored in `directory`, None when there is none. Raises ValueError naming the problem when the
    files do not match each other (a changed weight file, a spec edited by hand)."""
    directory = Path(directory)
    spec_file = directory / READER_SPEC
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
