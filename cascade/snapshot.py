"""An immutable view of everything a query needs: stage models, the space, its index and the cascade config.
A query takes one snapshot when it starts and finishes on it, whatever swaps happen meanwhile."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from cascade.config import CascadeConfig
from cascade.embedding import EmbeddingIndex
from cascade.errors import RequestError
from cascade.index import ClusterIndex
from cascade.item_store import DTYPES, ITEM_INPUTS_DIR, features_digest, mapped_table
from cascade.npz_map import shared_tensor
from cascade.queries import QuerySet
from cascade.space import Space
from cascade.stage import check_stages
from models.aggregation import log_prior_of
from models.calibration import is_temperature
from models.cluster_reader_store import StoredReader, load_reader
from models.flops import Flops
from models.gadget import gadget_misfit
from models.manifest import Manifest
from models.pair import PairNetwork, pair_flops, pair_query_flops
from models.registry import LoadedModel, ModelRegistry
from models.scorer import SCORER_KINDS, Scorer, cluster_context, item_inputs, item_inputs_key

log = logging.getLogger("prunecascade.snapshot")

__all__ = [
    "Variant",
    "Snapshot",
    "ItemCache",
    "CachedInputs",
    "load_snapshot",
    "build_snapshot",
    "variant_for",
    "misfit",
    "ITEM_INPUTS_DIR",
]


@dataclass(frozen=True)
class Variant:
    model: Scorer
    manifest: Manifest
    gadget: torch.nn.Module | None
    log_prior: torch.Tensor
    """Prior over the model's outputs, for `bayes`: the space's class frequencies for a classifier, the
    training grade mix for a pair model."""
    flops: Flops
    """Per item (a classifier) or per (query, item) pair (a pair model), as served."""
    query_flops: int = 0
    """Paid once per query and stage on the many-items path (a pair model's query trunk and fold); 0 for a
    classifier. `cost(n)` is exact for any n."""
    inputs_key: str | None = None
    """`models.scorer.item_inputs_key` of the model (None: it reads raw items); set by `variant_for`."""
    gadget_sha256: str | None = None
    """Digest of the gadget's stored weights: part of the snapshot id, so a replaced gadget is a new snapshot."""

    def cost(self, num_items: int, prepared_for: int | None = None) -> Flops:
        """FLOPs of one query (one example) against `num_items` items as this variant serves them (a pair
        model picks folded or plain by the number; item inputs come from the snapshot's cache).
        `prepared_for`: the query was prepared before for that many items and is reused (no query cost). A model
        whose cost depends on its path (a pair model: folded or plain) counts itself; any other costs `flops` per
        item whatever the query."""
        priced = getattr(self.model, "flops", None)
        if callable(priced):
            return priced(num_items, prepared_for=prepared_for)
        return self.flops * num_items

    @property
    def kind(self) -> str:
        return self.model.scorer_kind

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version


@dataclass(frozen=True)
class CachedInputs:
    """One table of item inputs (`models.scorer.item_inputs`) for every item of the space."""

    key: str
    table: torch.Tensor  # (num_items, width) float32, or float16 (`ItemCache(dtype=...)`)
    build_flops: int  # paid once, when the table is built (counted here, not per query)
    build_ms: float
    mapped: bool = False  # a read-only memory map of a file that every worker process shares

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()


class ItemCache:
    """Query-independent item inputs, one table per `item_inputs_key`, built on first use (a pair model's
    trunk over all items: 100,000 items x 1,408 floats = 563 MB for the default pair models) and shared by
    every variant with that key. Thread safe: concurrent first queries build a table once.

    With a `directory`, tables are files there, memory-mapped read-only (`cascade.item_store`): the worker
    processes of a server share one copy. `dtype` float16 halves the table (rows are widened to float32 when
    gathered, so the models still compute in float32; answers move slightly, docs/operations.md)."""

    def __init__(self, directory: Path | None = None, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"item cache dtype must be one of {', '.join(DTYPES)}")
        self._lock = threading.Lock()
        self._tables: dict[str, CachedInputs] = {}
        self.directory = directory
        self.dtype = dtype

    def get(
        self, key: str, build: Callable[[], tuple[torch.Tensor, int]], stable_key: Callable[[], str] | None = None
    ) -> CachedInputs:
        """`stable_key`: names the table's contents the same in every process (needed to share a file)."""
        entry = self._tables.get(key)
        if entry is not None:
            return entry
        with self._lock:
            entry = self._tables.get(key)
            if entry is None:
                started = time.perf_counter()
                mapped = False
                if self.directory is not None and stable_key is not None:
                    table, flops, mapped = mapped_table(self.directory, stable_key(), self.dtype, build)
                else:
                    table, flops = build()
                    table = table.to(DTYPES[self.dtype])
                entry = CachedInputs(key, table, flops, (time.perf_counter() - started) * 1000.0, mapped)
                self._tables[key] = entry
        return entry

    def entries(self) -> list[CachedInputs]:
        return list(self._tables.values())

    def retain(self, keys: set[str]) -> None:
        """Drop the tables no served variant reads any more (a replaced trunk); a query still holding one keeps
        it alive until it is done."""
        with self._lock:
            self._tables = {k: v for k, v in self._tables.items() if k in keys}


def _offsets_digest(offsets: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(offsets, dtype=np.int64).tobytes()).hexdigest()[:12]


def _build_inputs(
    model: Scorer, features: torch.Tensor, offsets: np.ndarray, chunk: int = 4096
) -> tuple[torch.Tensor, int]:
    with torch.inference_mode():
        context = cluster_context(model, features, offsets)  # per item, what it reads of its whole cluster
        first = item_inputs(model, features[:1], None if context is None else context[:1])
        table = torch.empty(len(features), first.shape[1], dtype=first.dtype)
        for i in range(0, len(features), chunk):
            rows = None if context is None else context[i : i + chunk]
            table[i : i + chunk] = item_inputs(model, features[i : i + chunk], rows)
    per_item = model.item_input_flops().nonzero if hasattr(model, "item_input_flops") else 0
    return table, len(features) * per_item


@dataclass(frozen=True)
class Snapshot:
    id: str
    space: Space
    index: ClusterIndex
    features: torch.Tensor
    variants: Mapping[str, Variant]
    config: CascadeConfig
    log_prior: torch.Tensor
    embedding: EmbeddingIndex | None = None
    queries: QuerySet | None = None
    item_cache: ItemCache = field(default_factory=ItemCache, compare=False, repr=False)
    reader: StoredReader | None = field(default=None, compare=False, repr=False)
    """The cluster reader stored beside the space (`cascade.reader`), None where there is none or it is broken."""

    def cached_inputs(self, variant: Variant) -> CachedInputs | None:
        """The variant's item inputs for every item (built on first use), or None when it reads raw items."""
        if variant.inputs_key is None:
            return None
        return self.item_cache.get(
            self._cache_key(variant),
            lambda: _build_inputs(variant.model, self.features, self.space.offsets),
            # the inputs may read each item's whole cluster (a retriever's centroid), so the clustering is part of
            # the stored table's name as well as the items
            lambda: f"{variant.inputs_key}@{features_digest(self.features)}-{_offsets_digest(self.space.offsets)}",
        )

    def warm(self) -> None:
        """Build every item-input table the variants read now, not on the first query (which would pay it: 0.65 s
        for 23,000 items, 1.9 s for 100,000, docs/performance.md section 0), and forget tables no variant reads."""
        keys = set()
        for variant in self.variants.values():
            if variant.inputs_key is not None:
                keys.add(self._cache_key(variant))
                self.cached_inputs(variant)
        if self.reader is not None:
            keys.add(self.reader_inputs().key)
        self.item_cache.retain(keys)

    def reader_inputs(self) -> CachedInputs:
        """Every item's keys and values for the cluster reader (`ReaderRanker.item_table`), built once per items and
        reader and kept in the item cache beside the pair models' tables."""
        stored = self.reader
        assert stored is not None

        def build() -> tuple[torch.Tensor, int]:
            with torch.inference_mode():
                x = self.features
                table = torch.cat([stored.ranker.item_table(x[i : i + 4096]) for i in range(0, len(x), 4096)])
            return table, len(x) * stored.ranker.item_flops()

        return self.item_cache.get(
            f"reader:{stored.sha256}@{self.features.data_ptr()}:{tuple(self.features.shape)}",
            build,
            lambda: f"reader:{stored.sha256}@{features_digest(self.features)}",
        )

    def _cache_key(self, variant: Variant) -> str:
        # keyed by the features too: `dataclasses.replace` with other features shares the cache object
        return f"{variant.inputs_key}@{self.features.data_ptr()}:{tuple(self.features.shape)}"

    def item_inputs(self, variant: Variant, rows: torch.Tensor) -> torch.Tensor:
        """What `variant.model.score_prepared` reads for these rows: cached inputs, or the raw features."""
        cached = self.cached_inputs(variant)
        rows_in = torch.index_select(self.features if cached is None else cached.table, 0, rows)
        return rows_in if rows_in.dtype == torch.float32 else rows_in.float()

    @property
    def dense(self) -> Variant:
        return self.variants[self.config.dense]

    @functools.cached_property
    def oracle_flops(self) -> Mapping[str, int]:
        """What the dense exhaustive oracle costs for one example, per kind of target (`classifier`, and `pair`
        when a dense pair model is served): the dense model of that kind on every item, counted once per
        snapshot (a query's `dense_flops` reads it)."""
        items = int(self.space.sizes.sum())
        costs = {}
        for kind in SCORER_KINDS:
            try:
                dense = self.variants[self.config.dense_for(kind)]
            except LookupError:  # no dense model of that kind: no oracle either
                continue
            costs[kind] = dense.cost(items).nonzero
        return MappingProxyType(costs)

    def dense_for(self, kind: str) -> Variant:
        try:
            return self.variants[self.config.dense_for(kind)]
        except LookupError as exc:
            raise RequestError("target", str(exc.args[0])) from None

    @property
    def num_grades(self) -> int:
        """Relevance grades of the pair models (0 when the snapshot has none)."""
        if self.config.pair_dense is None or self.config.pair_dense not in self.variants:
            return 0
        return int(self.variants[self.config.pair_dense].manifest.spec.get("num_grades", 3))


def _snapshot_id(
    space: Space, variants: Mapping[str, Variant], config: CascadeConfig, reader: StoredReader | None = None
) -> str:
    blob = json.dumps(
        {
            "space": space.meta.get("id", ""),
            "reader": "" if reader is None else reader.sha256,
            "variants": sorted(
                (v.name, v.version, v.manifest.sha256, v.gadget_sha256 or "") for v in variants.values()
            ),
            "config": config.model_dump(mode="json"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def misfit(manifest: Manifest, space: Space) -> str | None:
    """Why a model cannot serve this space, or None when it can."""
    spec = manifest.spec
    if spec.get("input_dim") != space.input_dim:
        return f"takes {spec.get('input_dim')} inputs; the space's items have {space.input_dim} features"
    if spec.get("kind") != "pair" and spec.get("num_classes") != space.num_classes:
        return f"predicts {spec.get('num_classes')} classes; the space has {space.num_classes}"
    return None


def served_temperature(manifest: Manifest) -> float:
    """Posteriors that mean what they say: the temperature fitted when the model was registered
    (`posterior_calibration`), or 1 where there is none or it is not a number in [0.05, 20] (an entry edited by
    hand is served uncalibrated, not refused)."""
    value = (manifest.extra.get("posterior_calibration") or {}).get("temperature", 1.0)
    if is_temperature(value):
        return float(value)
    log.warning("%s: posterior_calibration.temperature %r is not in [0.05, 20]; served with T = 1", manifest.ref, value)
    return 1.0


def variant_for(loaded: LoadedModel, space: Space) -> Variant:
    """A loaded model as a stage of this space's cascades, with the prior its `bayes` aggregation needs."""
    manifest = loaded.manifest
    if isinstance(loaded.model, PairNetwork):
        grade_prior = manifest.extra.get("grade_prior")
        if grade_prior is None:
            raise RequestError("version", f"{manifest.ref} is a pair model without a grade_prior in its manifest")
        log_prior = log_prior_of(torch.tensor(grade_prior, dtype=torch.float64))
        loaded.model.temperature = served_temperature(manifest)
        gadget, gadget_sha256 = loaded.gadget, loaded.gadget_sha256
        reason = None if gadget is None else gadget_misfit(gadget, loaded.model)
        if reason is not None:  # `prunecascade gadget` never stores one; a file changed by hand: serve without it
            log.warning("%s: its stored gadget is not used: %s", manifest.ref, reason)
            gadget, gadget_sha256 = None, None
        # counted from the model as this code serves it (item inputs cached, query folded), not read from an
        # older manifest; `Variant.cost(n)` is exact for any number of items
        return Variant(
            loaded.model,
            manifest,
            gadget,
            log_prior,
            pair_flops(loaded.model),
            pair_query_flops(loaded.model).nonzero,
            item_inputs_key(loaded.model),
            gadget_sha256,
        )
    flops = Flops(manifest.flops_dense_kernel, manifest.flops_nonzero)
    log_prior = log_prior_of(shared_tensor(space.prior))
    return Variant(loaded.model, manifest, loaded.gadget, log_prior, flops, gadget_sha256=loaded.gadget_sha256)


def build_snapshot(
    space: Space,
    index: ClusterIndex,
    variants: Mapping[str, Variant],
    config: CascadeConfig,
    embedding: EmbeddingIndex | None = None,
    queries: QuerySet | None = None,
    item_cache: ItemCache | None = None,
    reader: StoredReader | None = None,
) -> Snapshot:
    """`item_cache`: the tables of the snapshot this one replaces (same space), so that a swap that keeps the
    pair models' trunk does not rebuild them."""
    if config.dense not in variants:
        raise RequestError("dense", f"dense model {config.dense!r} is not among the active variants")
    if config.pair_dense is not None and config.pair_dense not in variants:
        raise RequestError("pair_dense", f"dense pair model {config.pair_dense!r} is not among the active variants")
    snap = Snapshot(
        id=_snapshot_id(space, variants, config, reader),
        space=space,
        index=index,
        features=shared_tensor(space.features),
        variants=MappingProxyType(dict(variants)),
        config=config,
        log_prior=log_prior_of(shared_tensor(space.prior)),
        embedding=embedding,
        queries=queries,
        item_cache=item_cache if item_cache is not None else ItemCache(),
        reader=reader,
    )
    check_stages(config.stages, snap.variants, k=1)
    if config.pair_stages:  # () is FAISS only: no stage to check
        check_stages(config.pair_stages, snap.variants, k=1, kind="pair")
    return snap


def load_snapshot(
    registry: ModelRegistry, space_dir: Path, config: CascadeConfig, item_cache: ItemCache | None = None
) -> Snapshot:
    """Active versions of every registered model that fits the space. `item_cache`: where the pair models'
    item inputs live (`ItemCache(space_dir / ITEM_INPUTS_DIR)` shares them between worker processes)."""
    space = Space.load(space_dir)
    index = ClusterIndex.load(space_dir)
    variants: dict[str, Variant] = {}
    for name in registry.names():
        if registry.active_version(name) is None:
            continue
        if misfit(registry.manifest(name), space) is None:
            variants[name] = variant_for(registry.load(name), space)
    embedding = EmbeddingIndex.load(space_dir)
    return build_snapshot(
        space,
        index,
        variants,
        config,
        embedding,
        QuerySet.load(space_dir),
        item_cache,
        served_reader(space_dir, space) if embedding is not None else None,
    )


def served_reader(space_dir: Path, space: Space) -> StoredReader | None:
    """The cluster reader stored beside the space, or None: a broken or misfitting one is logged and left out,
    so that it never stops a replica (queries by example are then answered without it)."""
    try:
        stored = load_reader(space_dir)
    except Exception as exc:  # whatever is wrong with the files, the space is still served without them
        log.warning("the cluster reader beside %s is not served: %s: %s", space_dir, type(exc).__name__, exc)
        return None
    if stored is not None and stored.spec.input_dim != space.input_dim:
        log.warning(
            "the cluster reader beside %s is not served: it reads %d features, the items have %d",
            space_dir,
            stored.spec.input_dim,
            space.input_dim,
        )
        return None
    return stored
