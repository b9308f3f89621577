"""An immutable view of everything a query needs: stage models, the space, its index and the cascade config.
A query takes one snapshot when it starts and finishes on it, whatever swaps happen meanwhile."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from cascade.config import CascadeConfig, Stage
from cascade.index import ClusterIndex
from cascade.space import Space
from models.aggregation import get_aggregator
from models.flops import Flops
from models.manifest import Manifest
from models.networks import Classifier
from models.registry import ModelRegistry

__all__ = ["Variant", "Snapshot", "StageError", "load_snapshot", "build_snapshot"]


class StageError(ValueError):
    """A stage list that cannot run on this snapshot; `field` names the offending part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Variant:
    model: Classifier
    manifest: Manifest
    gadget: torch.nn.Module | None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def flops(self) -> Flops:
        return Flops(self.manifest.flops_dense_kernel, self.manifest.flops_nonzero)


@dataclass(frozen=True)
class Snapshot:
    id: str
    space: Space
    index: ClusterIndex
    features: torch.Tensor
    variants: Mapping[str, Variant]
    config: CascadeConfig
    log_prior: torch.Tensor

    @property
    def dense(self) -> Variant:
        return self.variants[self.config.dense]

    def validate_stages(self, stages: tuple[Stage, ...] | list[Stage], k: int) -> None:
        """Every variant known and fitting the space, every aggregator known and usable, keep >= k."""
        if not stages:
            raise StageError("stages", "at least one stage is required")
        for i, stage in enumerate(stages):
            where = f"stages[{i}]"
            variant = self.variants.get(stage.variant)
            if variant is None:
                known = ", ".join(sorted(self.variants))
                raise StageError(f"{where}.variant", f"unknown variant {stage.variant!r}; active: {known}")
            try:
                agg = get_aggregator(stage.aggregator)
            except KeyError as exc:
                raise StageError(f"{where}.aggregator", str(exc.args[0])) from None
            if agg.needs_gadget and variant.gadget is None:
                raise StageError(f"{where}.aggregator", f"{stage.aggregator!r} needs a gadget; {variant.name} has none")
            last = i == len(stages) - 1
            if not last and stage.keep is None:
                raise StageError(f"{where}.keep", "every stage but the last must say how many clusters it keeps")
            if not last and stage.keep is not None and stage.keep < k:
                raise StageError(f"{where}.keep", f"keeps {stage.keep} clusters, fewer than k={k}")


def _snapshot_id(space: Space, variants: Mapping[str, Variant], config: CascadeConfig) -> str:
    blob = json.dumps(
        {
            "space": space.meta.get("id", ""),
            "variants": sorted((v.name, v.version, v.manifest.sha256) for v in variants.values()),
            "config": config.model_dump(mode="json"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_snapshot(
    space: Space, index: ClusterIndex, variants: Mapping[str, Variant], config: CascadeConfig
) -> Snapshot:
    if config.dense not in variants:
        raise StageError("dense", f"dense model {config.dense!r} is not among the active variants")
    snap = Snapshot(
        id=_snapshot_id(space, variants, config),
        space=space,
        index=index,
        features=torch.from_numpy(space.features),
        variants=MappingProxyType(dict(variants)),
        config=config,
        log_prior=torch.from_numpy(np.log(np.clip(space.prior, 1e-12, None))).float(),
    )
    snap.validate_stages(config.stages, k=1)
    return snap


def load_snapshot(registry: ModelRegistry, space_dir: Path, config: CascadeConfig) -> Snapshot:
    """Active versions of every registered model whose input size and classes fit the space."""
    space = Space.load(space_dir)
    index = ClusterIndex.load(space_dir)
    variants: dict[str, Variant] = {}
    for name in registry.names():
        if registry.active_version(name) is None:
            continue
        loaded = registry.load(name)
        spec = loaded.manifest.network_spec
        if spec.input_dim == space.input_dim and spec.num_classes == space.num_classes:
            variants[name] = Variant(loaded.model, loaded.manifest, loaded.gadget)
    return build_snapshot(space, index, variants, config)
