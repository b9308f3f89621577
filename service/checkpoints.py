"""Validation of an uploaded checkpoint, all of it before anything is written: checksum, safetensors format
(parsed, so pickles are refused and never unpickled), a parameter budget and the tensors checked against the
spec before any module is allocated, finiteness, fit to the space, FLOPs recomputed here, and the accuracy
gate on the space's probe set. Each failure names the part at fault; no input escapes as a 500."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors

from cascade.snapshot import Snapshot, Variant
from cascade.space import PAIR_PROBE_FILE, PROBE_FILE
from models.calibration import TEMPERATURES, is_temperature
from models.evaluation import accuracy
from models.flops import Flops, count_flops
from models.manifest import Manifest, utc_now
from models.networks import build_network
from models.pair import PairNetwork, pair_flops
from models.pair_evaluation import PairBatch, pair_accuracy
from models.registry import GADGET_SPEC_FILE, GADGET_WEIGHTS_FILE, WEIGHTS_FILE, state_dict_for_saving
from models.spec import MAX_CLASSES, MAX_INPUT_DIM, MAX_WIDTH, spec_int

__all__ = [
    "UploadError",
    "ValidatedUpload",
    "GatePolicy",
    "validate_upload",
    "refuse_oversized",
    "load_probe",
    "safetensors_header",
    "parse_json",
]

_PICKLE_HINT = "pickled checkpoints (.pt/.pth/.pkl) are refused and never unpickled; save with safetensors"
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


class UploadError(ValueError):
    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = message


def refuse_oversized(parts: tuple[tuple[str, bytes | None], ...], limit: int) -> None:
    """UploadError 413 naming the first uploaded part (field, bytes) larger than `limit` bytes."""
    for field, data in parts:
        if data is not None and len(data) > limit:
            raise UploadError(413, field, f"larger than {limit} bytes")


@dataclass(frozen=True)
class GatePolicy:
    accuracy_floor: float
    max_accuracy_drop: float | None
    flops_tolerance: float
    relative_accuracy_floor: float = 0.0
    """Fraction of the served dense model's probe accuracy an upload must reach (0 turns it off)."""
    max_params: int | None = None
    """Largest parameter count of a network or a gadget, checked from the spec before anything is built."""


@dataclass(frozen=True)
class ValidatedUpload:
    name: str
    files: dict[str, bytes]
    fields: dict[str, Any]
    """Manifest fields as the server measured them (version is assigned when stored)."""


@dataclass(frozen=True)
class Probe:
    """The space's held-out checks of an upload: labelled items for classifiers, graded (q, x) pairs for pair
    models; either may be missing."""

    x: np.ndarray | None = None
    y: np.ndarray | None = None
    pairs: PairBatch | None = None


def load_probe(space_dir: Path) -> Probe:
    x = y = None
    pairs = None
    if (space_dir / PROBE_FILE).exists():
        with np.load(space_dir / PROBE_FILE, allow_pickle=False) as data:
            x, y = data["x"].astype(np.float32), data["y"]
    if (space_dir / PAIR_PROBE_FILE).exists():
        with np.load(space_dir / PAIR_PROBE_FILE, allow_pickle=False) as data:
            pairs = PairBatch(
                torch.from_numpy(data["q"].astype(np.float32)),
                torch.from_numpy(data["x"].astype(np.float32)),
                torch.from_numpy(data["grade"].astype(np.int64)),
            )
    return Probe(x, y, pairs)


@dataclass(frozen=True)
class _Kind:
    """What differs between uploading a classifier and a pair model: how it is built and counted, what its
    outputs are, how the probe scores it, and which served dense model it is compared with."""

    spec: Any
    build: Callable[[Any], torch.nn.Module]
    flops: Callable[[torch.nn.Module], Flops]
    outputs: int
    hidden_dim: int
    score: Callable[[torch.nn.Module], float] | None
    dense: Variant | None
    chance: float
    """Probe accuracy of always answering the most frequent output: the relative gate counts skill above it."""


def _kind_of(manifest: Manifest, snapshot: Snapshot, probe: Probe) -> _Kind:
    space = snapshot.space
    if manifest.model_kind == "pair":
        spec = manifest.pair_spec
        if spec.input_dim != space.input_dim:
            raise UploadError(422, "manifest.spec.input_dim", f"{spec.input_dim}, the space has {space.input_dim}")
        if snapshot.num_grades == 0:
            raise UploadError(422, "manifest.spec.kind", "the served space has no pair models to gate a pair model")
        if spec.num_grades != snapshot.num_grades:
            raise UploadError(
                422,
                "manifest.spec.num_grades",
                f"{spec.num_grades}, the space's pair models have {snapshot.num_grades}",
            )
        _check_grade_prior(manifest.extra.get("grade_prior"), spec.num_grades)
        _check_calibration(manifest.extra.get("posterior_calibration"))
        pairs = probe.pairs
        return _Kind(
            spec,
            PairNetwork,
            pair_flops,  # type: ignore[arg-type]
            spec.num_grades,
            spec.scorer.hidden_dim,
            None if pairs is None else (lambda m: pair_accuracy(m, pairs)),  # type: ignore[arg-type]
            snapshot.dense_for("pair"),
            _chance(None if pairs is None else pairs.grade.numpy()),
        )
    spec = manifest.network_spec
    if spec.input_dim != space.input_dim:
        raise UploadError(422, "manifest.spec.input_dim", f"{spec.input_dim}, the space has {space.input_dim}")
    if spec.num_classes != space.num_classes:
        raise UploadError(422, "manifest.spec.num_classes", f"{spec.num_classes}, the space has {space.num_classes}")
    x, y = probe.x, probe.y
    return _Kind(
        spec,
        build_network,
        lambda m: count_flops(m, spec.input_dim),
        spec.num_classes,
        spec.hidden_dim,
        None if x is None else (lambda m: accuracy(m, x, y)),  # type: ignore[arg-type]
        snapshot.variants.get(snapshot.config.dense),
        _chance(y),
    )


def _chance(truth: np.ndarray | None) -> float:
    if truth is None or len(truth) == 0:
        return 0.0
    return float(np.bincount(np.asarray(truth, dtype=np.int64)).max() / len(truth))


def _check_grade_prior(prior: Any, num_grades: int) -> None:
    """A pair model's `bayes` needs the grade mix it was trained on (manifest extra.grade_prior)."""
    ok = (
        isinstance(prior, list)
        and len(prior) == num_grades
        and all(isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p) and p > 0 for p in prior)
        and abs(sum(prior) - 1.0) < 1e-6
    )
    if not ok:
        raise UploadError(
            422,
            "manifest.extra.grade_prior",
            f"required: {num_grades} positive numbers summing to 1 (the training mix)",
        )


def _check_calibration(calibration: Any) -> None:
    """A pair model's temperature (manifest extra.posterior_calibration), when it has one, divides every logit
    it serves: it must be a number within `models.calibration.TEMPERATURES`."""
    if calibration is None:
        return
    if not isinstance(calibration, dict) or not is_temperature(calibration.get("temperature")):
        low, high = TEMPERATURES
        raise UploadError(
            422,
            "manifest.extra.posterior_calibration.temperature",
            f"required when posterior_calibration is given: a number in [{low:g}, {high:g}]",
        )


def parse_json(raw: bytes, field: str) -> Any:
    """JSON from an upload part, with every way it can fail as a 422 naming the part: bad UTF-8, bad syntax,
    nesting deep enough to exhaust the recursion limit, integers longer than Python converts (4,300 digits)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise UploadError(422, field, "not valid JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError and the int-digits limit are ValueErrors
        raise UploadError(422, field, f"not valid JSON: {str(exc)[:200]}") from None


def _parse_manifest(raw: bytes) -> Manifest:
    data = parse_json(raw, "manifest")
    if not isinstance(data, dict):
        raise UploadError(422, "manifest", "must be a JSON object")
    data = {k: v for k, v in data.items() if k not in ("version", "created_at")}  # assigned by the server
    try:
        return Manifest(**{**data, "version": 1})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise UploadError(422, f"manifest.{loc}" if loc else "manifest", str(err["msg"])[:500]) from None
    except (TypeError, ValueError, LookupError, ArithmeticError, RecursionError) as exc:
        raise UploadError(422, "manifest", str(exc)[:500]) from None


def safetensors_header(raw: bytes) -> dict[str, Any] | None:
    """The JSON header when `raw` is laid out as safetensors (8-byte little-endian header length, then a JSON
    object of that length within the file), else None. Parsed, never guessed from a magic byte: a header of
    128 + 256 k bytes starts with 0x80 exactly like a pickle does."""
    if len(raw) < 10:
        return None
    (length,) = struct.unpack("<Q", raw[:8])
    if not 2 <= length <= min(_MAX_HEADER, len(raw) - 8) or raw[8:9] != b"{":
        return None
    try:
        header = json.loads(raw[8 : 8 + length])
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _parse_safetensors(raw: bytes, field: str) -> dict[str, torch.Tensor]:
    if safetensors_header(raw) is None:
        if raw[:1] == b"\x80" or raw[:4] == b"PK\x03\x04":
            raise UploadError(415, field, f"looks like a pickle or a torch zip archive: {_PICKLE_HINT}")
        raise UploadError(415, field, f"not a safetensors file (no valid header); {_PICKLE_HINT}")
    try:
        tensors = load_safetensors(raw)
    except Exception as exc:  # safetensors raises its own error types for every malformed header
        raise UploadError(415, field, f"not a safetensors file ({type(exc).__name__}); {_PICKLE_HINT}") from None
    return dict(tensors)


def _on_meta(build: Any, spec: Any) -> torch.nn.Module:
    """The module as shapes only (torch's meta device): no memory is allocated, however large the spec."""
    with torch.device("meta"):
        return build(spec)


def _check_budget(module: torch.nn.Module, field: str, max_params: int | None) -> None:
    params = sum(p.numel() for p in module.parameters())
    if max_params is not None and params > max_params:
        raise UploadError(
            422, field, f"{params:,} parameters exceed the budget of {max_params:,} (PRUNECASCADE_MAX_PARAMS)"
        )


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], field: str) -> None:
    """Same names, shapes and dtypes as the module built from the spec, and every value finite."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UploadError(422, field, f"missing tensor(s) the spec needs: {missing[:5]}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UploadError(422, field, f"tensor(s) the spec does not have: {unexpected[:5]}")
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise UploadError(422, field, f"{name}: shape {list(got.shape)} but the spec needs {list(want.shape)}")
        if got.dtype != want.dtype:
            raise UploadError(422, field, f"{name}: dtype {got.dtype} but the spec needs {want.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise UploadError(422, field, f"{name}: contains NaN or Inf")


def _check_flops(manifest: Manifest, flops: Flops, tolerance: float) -> tuple[int, int]:
    for key, measured in (("flops_dense_kernel", flops.dense_kernel), ("flops_nonzero", flops.nonzero)):
        claimed = getattr(manifest, key)
        if abs(claimed - measured) > tolerance * max(measured, 1):
            raise UploadError(422, f"manifest.{key}", f"claims {claimed} but the weights cost {measured} FLOPs")
    return flops.dense_kernel, flops.nonzero


def _gadget_spec(meta: Any) -> Any:
    """A `GadgetSpec` from untrusted JSON: every field type- and range-checked here, before `GadgetSpec` sees
    it (Infinity, 1e7 or a string would otherwise overflow or allocate)."""
    from models.gadget import GadgetSpec

    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict):
        raise UploadError(422, "gadget_spec.spec", "gadget.json must be an object with a `spec` object")
    d = meta["spec"]
    unknown = set(d) - {"kind", "input_dim", "num_classes", "hidden_size"}
    if unknown:
        raise UploadError(422, "gadget_spec.spec", f"unknown keys {sorted(str(k)[:40] for k in unknown)[:10]}")
    if d.get("kind") not in ("lstm", "deepsets"):
        raise UploadError(422, "gadget_spec.spec.kind", "required, one of lstm, deepsets")
    bounds = {"input_dim": (1, MAX_INPUT_DIM), "num_classes": (2, MAX_CLASSES), "hidden_size": (1, MAX_WIDTH)}
    values: dict[str, int] = {}
    for key, (low, high) in bounds.items():
        try:
            values[key] = spec_int(d, key, low, high, default=32 if key == "hidden_size" else None)
        except ValueError as exc:
            raise UploadError(422, f"gadget_spec.spec.{key}", str(exc)) from None
    if not isinstance(meta.get("sha256", ""), str | None) or not isinstance(meta.get("extra", {}), dict):
        raise UploadError(422, "gadget_spec", "`sha256` must be a string and `extra` an object")
    return GadgetSpec(d["kind"], values["input_dim"], values["num_classes"], values["hidden_size"])


def _gadget_files(
    gadget: bytes, gadget_spec: bytes | None, hidden_dim: int, num_classes: int, policy: GatePolicy
) -> tuple[dict[str, bytes], torch.nn.Module]:
    """The gadget's files as they will be stored, and the gadget itself (loaded, for the gate)."""
    from models.gadget import build_gadget

    if gadget_spec is None:
        raise UploadError(422, "gadget_spec", "a gadget needs its gadget.json (spec and sha256) beside it")
    meta = parse_json(gadget_spec, "gadget_spec")
    spec = _gadget_spec(meta)
    digest = hashlib.sha256(gadget).hexdigest()
    if meta.get("sha256") not in (None, digest):
        raise UploadError(422, "gadget_spec.sha256", "does not match the gadget bytes")
    if spec.input_dim != hidden_dim or spec.num_classes != num_classes:
        raise UploadError(
            422,
            "gadget_spec.spec",
            f"gadget reads {spec.input_dim}-d h into {spec.num_classes} classes; the network gives "
            f"{hidden_dim}-d h and {num_classes} classes",
        )
    module = _on_meta(build_gadget, spec)
    _check_budget(module, "gadget_spec.spec", policy.max_params)
    tensors = _parse_safetensors(gadget, "gadget")
    _check_tensors(tensors, state_dict_for_saving(module), "gadget")
    try:
        extra = json.loads(json.dumps(meta.get("extra", {}), allow_nan=False))
    except ValueError:
        raise UploadError(422, "gadget_spec.extra", "must be finite JSON (no NaN or Infinity)") from None
    stored = {
        "spec": spec.to_dict(),
        "flops_per_n": {str(n): spec.flops(n) for n in (1, 2, 4, 8, 16, 32)},
        "sha256": digest,
        "created_at": utc_now(),
        "extra": extra,
    }
    files = {GADGET_WEIGHTS_FILE: gadget, GADGET_SPEC_FILE: json.dumps(stored, indent=2).encode()}
    loaded = build_gadget(spec)
    loaded.load_state_dict(tensors, strict=True)
    return files, loaded.eval()


GADGET_GATE_NS = (2, 4, 8, 16)
"""Tuple sizes the gadget gate measures n-accuracy at (n = 1 needs no aggregator)."""
GADGET_GATE_TUPLES = 300
"""Tuples per size, drawn from the probe with a fixed seed (the same tuples for the gadget and the mean)."""


@torch.no_grad()
def gadget_n_accuracy(
    model: torch.nn.Module, gadget: torch.nn.Module, x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """(the gadget's, `mean_logit`'s) accuracy at naming the shared label of tuples of probe items of one label,
    averaged over `GADGET_GATE_NS`: a gadget is only worth serving if it aggregates at least about as well as
    averaging the members' logits, which needs no training at all."""
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    parts = [model.forward_with_hidden(xt[i : i + 4096]) for i in range(0, len(xt), 4096)]  # type: ignore[operator]
    logits, hidden = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    labels = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(0)
    by_label = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    gadget_hits = mean_hits = total = 0
    for n in GADGET_GATE_NS:
        eligible = [c for c, rows in by_label.items() if len(rows) >= n]
        if not eligible:
            continue
        chosen = rng.choice(eligible, size=GADGET_GATE_TUPLES)
        rows = np.concatenate([rng.choice(by_label[c], size=n, replace=False) for c in chosen])
        counts = torch.full((GADGET_GATE_TUPLES,), n, dtype=torch.long)
        index = torch.from_numpy(rows)
        truth = torch.from_numpy(chosen.astype(np.int64))
        predicted = gadget(hidden[index].float(), counts).argmax(1)
        averaged = logits[index].double().reshape(GADGET_GATE_TUPLES, n, -1).mean(1).argmax(1)
        gadget_hits += int((predicted == truth).sum())
        mean_hits += int((averaged == truth).sum())
        total += GADGET_GATE_TUPLES
    if total == 0:
        return 0.0, 0.0
    return gadget_hits / total, mean_hits / total


def validate_upload(
    manifest_raw: bytes,
    weights: bytes,
    gadget: bytes | None,
    gadget_spec: bytes | None,
    snapshot: Snapshot,
    probe: Probe,
    policy: GatePolicy,
    stored_kind: Callable[[str], str | None] | None = None,
) -> ValidatedUpload:
    """A classifier or a pair model (`manifest.spec.kind`): the same checks for both, against the probe of
    its kind and the served dense model of its kind. `stored_kind(name)`: the kind already stored under the
    manifest's name (a name keeps its kind, so the same-name gate always compares like with like)."""
    manifest = _parse_manifest(manifest_raw)
    stored = stored_kind(manifest.name) if stored_kind is not None else None
    if stored is not None and stored != manifest.model_kind:
        holds = "pair models" if stored == "pair" else "classifiers"
        what = "pair model" if manifest.model_kind == "pair" else "classifier"
        raise UploadError(422, "manifest.name", f"{manifest.name!r} holds {holds}; a {what} needs another name")
    digest = hashlib.sha256(weights).hexdigest()
    if digest != manifest.sha256:
        raise UploadError(422, "manifest.sha256", f"does not match the weights (they hash to {digest})")
    tensors = _parse_safetensors(weights, "weights")
    kind = _kind_of(manifest, snapshot, probe)
    shapes = _on_meta(kind.build, kind.spec)  # budget and tensors against the spec before any allocation
    _check_budget(shapes, "manifest.spec", policy.max_params)
    _check_tensors(tensors, state_dict_for_saving(shapes), "weights")
    model = kind.build(kind.spec)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    dense_kernel, nonzero = _check_flops(manifest, kind.flops(model), policy.flops_tolerance)

    files = {WEIGHTS_FILE: weights}
    loaded_gadget: torch.nn.Module | None = None
    if gadget is not None:
        gadget_files, loaded_gadget = _gadget_files(gadget, gadget_spec, kind.hidden_dim, kind.outputs, policy)
        files.update(gadget_files)
    elif gadget_spec is not None:
        raise UploadError(422, "gadget", "gadget_spec was given without the gadget weights")

    measured: float | None = None
    if kind.score is not None:
        measured = kind.score(model)
        if measured < policy.accuracy_floor:
            raise UploadError(
                422, "weights", f"probe accuracy {measured:.4f} is below the floor {policy.accuracy_floor:.4f}"
            )
        dense = kind.dense
        if dense is not None and policy.relative_accuracy_floor > 0:
            reference = kind.score(dense.model)  # type: ignore[arg-type]
            floor = kind.chance + policy.relative_accuracy_floor * max(reference - kind.chance, 0.0)
            if measured < floor:
                raise UploadError(
                    422,
                    "weights",
                    f"probe accuracy {measured:.4f} is below {floor:.4f}: chance ({kind.chance:.4f}) plus "
                    f"{policy.relative_accuracy_floor:g} of the dense {dense.manifest.ref}'s margin over chance "
                    f"({reference:.4f}) (PRUNECASCADE_RELATIVE_ACCURACY_FLOOR)",
                )
        current = snapshot.variants.get(manifest.name)
        if current is not None and current.kind == manifest.model_kind and policy.max_accuracy_drop is not None:
            baseline = kind.score(current.model)  # type: ignore[arg-type]
            if measured < baseline - policy.max_accuracy_drop:
                raise UploadError(
                    422,
                    "weights",
                    f"probe accuracy {measured:.4f} drops more than {policy.max_accuracy_drop:.4f} below "
                    f"{baseline:.4f} of the active {current.manifest.ref}",
                )
    gadget_accuracy: tuple[float, float] | None = None
    if loaded_gadget is not None and manifest.model_kind != "pair" and probe.x is not None and probe.y is not None:
        gadget_accuracy = gadget_n_accuracy(model, loaded_gadget, probe.x, probe.y)
        tolerance = policy.max_accuracy_drop if policy.max_accuracy_drop is not None else 0.0
        if gadget_accuracy[0] < gadget_accuracy[1] - tolerance:
            raise UploadError(
                422,
                "gadget",
                f"n-accuracy {gadget_accuracy[0]:.4f} on probe tuples (n in {list(GADGET_GATE_NS)}) is more than "
                f"{tolerance:g} below the mean of the members' logits ({gadget_accuracy[1]:.4f}), which needs no "
                "gadget (PRUNECASCADE_MAX_ACCURACY_DROP)",
            )
    fields = manifest.model_dump(exclude={"version", "created_at"})
    fields.update(
        flops_dense_kernel=dense_kernel,
        flops_nonzero=nonzero,
        accuracy=measured if measured is not None else manifest.accuracy,
        sha256=digest,
        created_at=utc_now(),
        extra={**manifest.extra, "uploaded": True, "claimed_accuracy": manifest.accuracy, "probe_accuracy": measured},
    )
    return ValidatedUpload(manifest.name, files, fields)
