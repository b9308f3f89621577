"""A versioned model registry on disk. An entry is `ROOT/<name>/<version>/{weights.safetensors,manifest.json}`;
`ROOT/<name>/ACTIVE` holds the active version. Writes go to a temporary directory renamed into place, so a
reader never sees half an entry, and loading never unpickles (safetensors only)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.flops import count_flops
from models.manifest import NAME_PATTERN, Manifest, utc_now
from models.networks import Classifier, build_network
from models.pair import PairNetwork, PairSpec, pair_cost, pair_flops, pair_query_flops
from models.spec import NetworkSpec

__all__ = [
    "ModelRegistry",
    "build_model",
    "LoadedModel",
    "RegistryError",
    "BrokenEntryError",
    "KindMismatchError",
    "sha256_file",
    "write_atomic",
    "WEIGHTS_FILE",
    "MANIFEST_FILE",
    "GADGET_WEIGHTS_FILE",
    "GADGET_SPEC_FILE",
]

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
GADGET_WEIGHTS_FILE = "gadget.safetensors"
GADGET_SPEC_FILE = "gadget.json"
_ACTIVE = "ACTIVE"
_HISTORY = "HISTORY"
_LOCK = ".lock"


class RegistryError(LookupError):
    """Unknown name or version, or an entry whose files do not match its manifest."""


class BrokenEntryError(RegistryError):
    """An entry exists on disk but its manifest (or ACTIVE file) cannot be read or does not validate."""


class KindMismatchError(ValueError):
    """A name holds models of one kind (classifier or pair model): another kind needs another name, or the
    same-name gates (which compare a version with the one before) would compare unlike models."""


@dataclass(frozen=True)
class LoadedModel:
    model: Classifier | PairNetwork
    """A `PairNetwork` when the manifest's spec has `"kind": "pair"`, else a `Classifier`."""
    manifest: Manifest
    gadget: torch.nn.Module | None = None
    """The variant's trained aggregation gadget (the `lstm` aggregator), when one is stored beside it."""
    gadget_sha256: str | None = None
    """The stored gadget's weights digest (`gadget.json`), so a server can tell a gadget replaced on disk."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it and one rename: a reader sees the old file or the new."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights only: mask buffers are dropped (masked weights are stored as zeros)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if not k.endswith("_mask")}


def build_model(spec: dict[str, Any]) -> Classifier | PairNetwork:
    """An untrained model of either kind from a manifest's spec dict (`"kind": "pair"` -> `PairNetwork`)."""
    if spec.get("kind") == "pair":
        return PairNetwork(PairSpec.from_dict(spec))
    return build_network(NetworkSpec.from_dict(spec))


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- reading -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[int]:
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())

    def active_version(self, name: str) -> int | None:
        f = self.root / name / _ACTIVE
        if not f.exists():
            return None
        text = f.read_text(errors="replace").strip()
        if not text.isdigit() or len(text) > 10:
            raise BrokenEntryError(f"{name}: ACTIVE holds {text[:20]!r}, not a version number")
        return int(text)

    def entry_dir(self, name: str, version: int | None = None) -> Path:
        if version is None:
            version = self.active_version(name)
            if version is None:
                raise RegistryError(
                    f"model {name!r} has no active version" if self.versions(name) else f"unknown model {name!r}"
                )
        d = self.root / name / str(version)
        if not d.is_dir():
            raise RegistryError(f"model {name!r} has no version {version}")
        return d

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        return _read_manifest(self.entry_dir(name, version))

    def load(self, name: str, version: int | None = None) -> LoadedModel:
        d = self.entry_dir(name, version)
        manifest = _read_manifest(d)
        weights = d / WEIGHTS_FILE
        if sha256_file(weights) != manifest.sha256:
            raise RegistryError(f"{manifest.ref}: weights do not match the manifest's sha256")
        model = build_model(manifest.spec)
        model.load_state_dict(load_file(weights), strict=True)
        model.eval()
        gadget_digest = self.gadget_digest(manifest.name, manifest.version)
        return LoadedModel(model, manifest, self.load_gadget(manifest.name, manifest.version), gadget_digest)

    def gadget_digest(self, name: str, version: int | None = None) -> str | None:
        """The sha256 `gadget.json` records for the gadget beside a variant (None: no gadget): cheap, for telling
        whether a loaded variant's gadget is still the one on disk."""
        spec_file = self.entry_dir(name, version) / GADGET_SPEC_FILE
        if not spec_file.exists():
            return None
        try:
            return str(json.loads(spec_file.read_text())["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return "unreadable"

    def kind_of(self, name: str) -> str | None:
        """The kind (`classifier` or `pair`) of the models stored under `name` (its newest readable manifest);
        None for a name with none."""
        for v in reversed(self.versions(name)):
            try:
                return _read_manifest(self.root / name / str(v)).model_kind
            except BrokenEntryError:
                continue
        return None

    def check_kind(self, name: str, kind: str) -> None:
        """Raises KindMismatchError when `name` already holds models of another kind."""
        stored = self.kind_of(name)
        if stored is not None and stored != kind:
            article = "a pair model" if kind == "pair" else "a classifier"
            raise KindMismatchError(
                f"{name!r} holds {'pair models' if stored == 'pair' else 'classifiers'}; {article} needs another name"
            )

    @contextmanager
    def name_lock(self, name: str) -> Iterator[None]:
        """Exclusive over everything that writes versions of `name`, across threads and processes sharing the
        registry (an advisory `flock` on `ROOT/<name>/.lock`), so a look-up and the write it decides are one step."""
        (self.root / name).mkdir(parents=True, exist_ok=True)
        with (self.root / name / _LOCK).open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def active_manifests(self) -> list[Manifest]:
        return [self.manifest(n) for n in self.names() if self.active_version(n) is not None]

    def load_gadget(self, name: str, version: int | None = None) -> torch.nn.Module | None:
        """The aggregation gadget stored beside a variant, or None. Safetensors + JSON only (never unpickles);
        the JSON is written last and carries the weights' sha256, so a half-written pair is refused."""
        from models.gadget import GadgetSpec, build_gadget

        d = self.entry_dir(name, version)
        spec_file, weights = d / GADGET_SPEC_FILE, d / GADGET_WEIGHTS_FILE
        if not spec_file.exists():
            return None
        meta = json.loads(spec_file.read_text())
        if not weights.exists() or sha256_file(weights) != meta.get("sha256"):
            raise RegistryError(f"{name}:{d.name}: gadget weights missing or not matching gadget.json")
        gadget = build_gadget(GadgetSpec.from_dict(meta["spec"]))
        gadget.load_state_dict(load_file(weights), strict=True)
        return gadget.eval()

    # -- writing -------------------------------------------------------------------------------------------
    def save_gadget(
        self, name: str, version: int, gadget: torch.nn.Module, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Store a trained gadget beside `name:version` (replacing any earlier one). Weights are renamed into
        place first, then `gadget.json` (spec, FLOPs per n, sha256), each atomically. Returns the JSON."""
        from models.gadget import Gadget

        if not isinstance(gadget, Gadget):
            raise TypeError("only models.gadget gadgets can be stored")
        d = self.entry_dir(name, version)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{GADGET_WEIGHTS_FILE}.")
        os.close(fd)
        try:
            save_file(state_dict_for_saving(gadget), tmp)
            digest = sha256_file(Path(tmp))
            os.replace(tmp, d / GADGET_WEIGHTS_FILE)
        finally:
            Path(tmp).unlink(missing_ok=True)
        meta = {
            "spec": gadget.spec.to_dict(),
            "flops_per_n": {str(n): gadget.flops(n) for n in (1, 2, 4, 8, 16, 32)},
            "sha256": digest,
            "created_at": utc_now(),
            "extra": extra or {},
        }
        write_atomic(d / GADGET_SPEC_FILE, json.dumps(meta, indent=2))
        return meta

    def register(
        self,
        name: str,
        model: Classifier | PairNetwork,
        *,
        accuracy: float,
        parent: str | None = None,
        method: str = "dense",
        keep: float = 1.0,
        dataset: str = "",
        output_deviation: tuple[float, float] = (0.0, 0.0),
        extra: dict[str, Any] | None = None,
        activate: bool = True,
    ) -> Manifest:
        """Store `model` as the next version of `name`; FLOPs and the checksum are computed here."""

        if not re.match(NAME_PATTERN, name):
            raise ValueError(f"invalid model name {name!r}: lowercase letters, digits, '.', '_' and '-'")
        self.check_kind(name, "pair" if isinstance(model, PairNetwork) else "classifier")
        extra = dict(extra or {})
        if isinstance(model, PairNetwork):  # FLOPs per (q, x) pair; trunk and cache size recorded beside them
            cost = pair_cost(model)
            flops = pair_flops(model)
            extra.setdefault("flops_per_item_trunk", cost.per_item.dense_kernel)
            extra.setdefault("flops_per_query", pair_query_flops(model).dense_kernel)  # query trunk + fold
            extra.setdefault("cache_floats_per_item", cost.cache_floats_per_item)
        else:
            flops = count_flops(model, model.spec.input_dim)
        (self.root / name).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root / name, prefix=".staging-"))
        try:
            save_file(state_dict_for_saving(model), str(staging / WEIGHTS_FILE))
            fields: dict[str, Any] = dict(
                name=name,
                spec=model.spec.to_dict(),
                parent=parent,
                method=method,
                keep=keep,
                dataset=dataset,
                flops_dense_kernel=flops.dense_kernel,
                flops_nonzero=flops.nonzero,
                accuracy=accuracy,
                output_deviation=output_deviation[0],
                output_deviation_p95=output_deviation[1],
                sha256=sha256_file(staging / WEIGHTS_FILE),
                created_at=utc_now(),
                extra=extra,
            )
            manifest = self.commit_staged(staging, fields)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if activate:
            self.activate(name, manifest.version)
        return manifest

    def commit_staged(self, staging: Path, fields: dict[str, Any]) -> Manifest:
        """Move a staged directory holding the weights into the next free version (mkdir claims it)."""
        name = fields["name"]
        while True:
            version = max(self.versions(name), default=0) + 1
            target = self.root / name / str(version)
            try:
                target.mkdir()
            except FileExistsError:
                continue
            break
        manifest = Manifest(**{**fields, "version": version})
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
        for f in staging.iterdir():
            os.replace(f, target / f.name)
        return manifest

    def activate(self, name: str, version: int, record: bool = True) -> None:
        """Make `version` active; `record` appends it to the activation history that `rollback` walks."""
        self.entry_dir(name, version)  # raises for an unknown version
        write_atomic(self.root / name / _ACTIVE, f"{version}\n")
        if record:
            history = self.history(name)
            if not history or history[-1] != version:
                self._write_history(name, [*history, version][-100:])

    def history(self, name: str) -> list[int]:
        """Versions in the order they were activated (most recent last), capped at 100."""
        f = self.root / name / _HISTORY
        if not f.exists():
            return []
        try:
            return [int(v) for v in json.loads(f.read_text())]
        except (ValueError, TypeError):
            return []

    def _write_history(self, name: str, history: list[int]) -> None:
        write_atomic(self.root / name / _HISTORY, json.dumps(history))

    def rollback_target(self, name: str, current: int) -> int | None:
        """The version active before `current` that still exists; else the highest existing one below it."""
        existing = set(self.versions(name))
        history = self.history(name)
        while history and history[-1] == current:
            history.pop()
        for v in reversed(history):
            if v in existing and v != current:
                return v
        older = [v for v in existing if v < current]
        return max(older) if older else None

    def rollback(self, name: str, current: int, target: int) -> None:
        """Activate `target`, dropping `current` (and anything after `target`) from the history."""
        history = self.history(name)
        while history and history[-1] != target:
            history.pop()
        self._write_history(name, history or [target])
        self.activate(name, target, record=False)

    def store_upload(
        self, name: str, files: dict[str, bytes], fields: dict[str, Any], gadget_sha256: str | None
    ) -> tuple[Manifest, bool]:
        """The stored version with exactly these weights and gadget if there is one (False), else a new inactive
        version (True): looked up and written under the name's lock, so identical uploads sent at the same moment
        store one version between them."""
        with self.name_lock(name):
            existing = self.find_identical(name, fields["sha256"], gadget_sha256)
            if existing is not None:
                return existing, False
            return self.stage_files(name, files, fields), True

    def stage_files(self, name: str, files: dict[str, bytes], fields: dict[str, Any]) -> Manifest:
        """Store already-validated file contents as the next (inactive) version of `name`."""
        if not re.match(NAME_PATTERN, name):
            raise ValueError(f"invalid model name {name!r}")
        if MANIFEST_FILE in files or any("/" in f or f.startswith(".") for f in files):
            raise ValueError("invalid file names for a registry entry")
        self.check_kind(name, "pair" if fields.get("spec", {}).get("kind") == "pair" else "classifier")
        (self.root / name).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root / name, prefix=".staging-"))
        try:
            for fname, data in files.items():
                (staging / fname).write_bytes(data)
            return self.commit_staged(staging, {**fields, "name": name})
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete(self, name: str, version: int) -> None:
        if self.active_version(name) == version:
            raise ValueError(f"{name}:{version} is active; activate another version first")
        shutil.rmtree(self.entry_dir(name, version))

    def find_identical(self, name: str, sha256: str, gadget_sha256: str | None) -> Manifest | None:
        """The stored version of `name` with exactly these weights (and this gadget, or none), if any: an
        identical re-upload is answered with it instead of a duplicate version."""
        for v in self.versions(name):
            d = self.root / name / str(v)
            try:
                m = _read_manifest(d)
                spec_file = d / GADGET_SPEC_FILE
                stored_gadget = json.loads(spec_file.read_text()).get("sha256") if spec_file.exists() else None
            except (RegistryError, ValueError, OSError, AttributeError):
                continue  # a broken entry is never "the same" as a valid upload
            if m.sha256 == sha256 and stored_gadget == gadget_sha256:
                return m
        return None

    def describe(self) -> list[dict[str, Any]]:
        """Every version of every name, with which one is active (for listings). Robust to whatever is on disk:
        an entry whose manifest does not read or validate is listed with `broken` saying why, never raised."""
        out: list[dict[str, Any]] = []
        for name in self.names():
            try:
                active = self.active_version(name)
            except BrokenEntryError:
                active = None
            for v in self.versions(name):
                try:
                    m = _read_manifest(self.root / name / str(v))
                    out.append({**json.loads(m.model_dump_json()), "active": v == active})
                except BrokenEntryError as exc:
                    out.append({"name": name, "version": v, "active": v == active, "broken": str(exc)})
        return out


def _read_manifest(entry: Path) -> Manifest:
    """The entry's manifest, validated; any failure (missing, unreadable, invalid) is a BrokenEntryError."""
    try:
        return Manifest.model_validate_json((entry / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # pydantic's ValidationError is a ValueError
        first = exc.errors()[0] if hasattr(exc, "errors") else None
        why = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else f"{type(exc).__name__}: {exc}"
        raise BrokenEntryError(f"{entry.parent.name}:{entry.name}: manifest is broken ({why[:300]})") from None
