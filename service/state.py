"""The service's one piece of mutable state: the current snapshot, replaced whole. Every change (activation,
rollback, a new default cascade, adopting the shared state) builds a complete candidate snapshot first and
only then writes to disk and swaps, under one lock, so nothing is ever half-applied and a query that already
holds the old snapshot finishes on it."""

from __future__ import annotations

import logging
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cascade.batcher import Batcher
from cascade.config import CONFIG_FILE, CascadeConfig, ReaderChoice
from cascade.embedding import EmbeddingIndex
from cascade.errors import RequestError
from cascade.exact import ExactTable
from cascade.index import ClusterIndex
from cascade.queries import QuerySet
from cascade.reader import at_confidence
from cascade.snapshot import (
    ITEM_INPUTS_DIR,
    ItemCache,
    Snapshot,
    Variant,
    build_snapshot,
    misfit,
    served_reader,
    variant_for,
)
from cascade.space import Space
from models.cluster_reader_store import stored_digest
from models.registry import BrokenEntryError, ModelRegistry, RegistryError
from service.degraded import Fault, fallback_versions, servable_config
from service.exact_tables import ExactTables
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.cache import ResultCache

__all__ = ["ServiceState", "ConflictError", "SharedChanges", "LoadedHome", "home_fingerprint"]

log = logging.getLogger("prunecascade")


class SharedChanges(Protocol):
    """What the state asks of the replica sync (`service.shared_state.SharedState`, set when Redis is
    configured): declared here, so that the sync depends on the state and not the other way round."""

    def mark_dirty(self, name: str | None) -> None: ...

    def dirty(self) -> tuple[set[str], bool]: ...

    def push(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class BackgroundJob(Protocol):
    """A job the server runs beside its queries (`service.reader_training.ReaderTraining`), declared here for
    the same reason."""

    def start(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class LoadedHome:
    """What `ServiceState.load` reads from a home, built into a snapshot not yet served, and the state of the
    home's files it was read from (`home_fingerprint`)."""

    snapshot: Snapshot
    active: Mapping[str, int]
    unreadable: Mapping[str, str]
    config: CascadeConfig
    degraded: tuple[dict[str, Fault], dict[str, list[str]]]
    fingerprint: tuple[tuple[str, int, int, int], ...]


def home_fingerprint(settings: Settings) -> tuple[tuple[str, int, int, int], ...]:
    """(path, size, mtime, inode) of every file a load reads: the default cascades, the registry, the space's
    directory (its item-input tables aside: a load only maps them). Equal fingerprints mean a load would read
    the same files; files being written (names starting with a dot) are left out."""
    files = [settings.home / CONFIG_FILE]
    if settings.registry_dir.is_dir():
        files += sorted(settings.registry_dir.rglob("*"))
    if settings.space_dir.is_dir():
        files += sorted(settings.space_dir.iterdir())
    out = []
    for path in files:
        if any(part.startswith(".") for part in path.relative_to(settings.home).parts):
            continue
        try:
            st = path.stat()
        except OSError:  # removed while listed, or never there
            continue
        if stat.S_ISREG(st.st_mode):
            out.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class ConflictError(ValueError):
    """The change contradicts the current state (deleting the active version, nothing to roll back to)."""


class ServiceState:
    def __init__(self, settings: Settings, metrics: Metrics | None = None, preloaded: LoadedHome | None = None) -> None:
        self.settings = settings
        self._preloaded = preloaded  # read by this process's parent before it forked; served by the first load
        self.metrics = metrics or Metrics()
        self.registry = ModelRegistry(settings.registry_dir)
        self._snapshot: Snapshot | None = None
        self._active: dict[str, int] = {}
        self._config: CascadeConfig | None = None  # as configured; a snapshot serves it cut down to what loads
        self._unreadable: dict[str, str] = {}  # names whose ACTIVE does not read as a version, and why
        # per snapshot id (the current one and a few before, which queries may still hold): the registry faults
        # it works around and the warnings its answers carry, per target kind
        self._degraded: dict[str, tuple[dict[str, Fault], dict[str, list[str]]]] = {}
        self.lock = threading.RLock()
        self.load_error: str | None = None
        self.bootstrap_progress: dict[str, object] | None = None
        self.shared: SharedChanges | None = None  # set when Redis is configured
        self.cache: ResultCache | None = None
        self.reader_training: BackgroundJob | None = None  # TRAIN_READER: the reader trained in the background
        # concurrent queries with the same stages computed as one batch (same answers as alone)
        self.batcher = (
            Batcher(settings.batch_max_wait_ms / 1000.0, settings.batch_max_queries, self._count_batch)
            if settings.batching
            else None
        )
        self.loaded = threading.Event()
        self.settled = threading.Event()  # the loader thread is done: the bootstrap has ended, loaded or not
        self.generation = 0  # bumped by every local change; a reconcile that read Redis before it stands down
        self._misfits_logged: set[tuple[str, int]] = set()  # active versions that do not fit, logged once each
        self._faults_logged: set[tuple[str, int | None, int | None]] = set()  # broken entries, logged once each
        self.exact = ExactTables(
            settings.space_dir,
            enabled=settings.exact_enabled,
            max_bytes=settings.exact_max_bytes,
        )

    def _count_batch(self, size: int) -> None:
        self.metrics.batches.inc()
        self.metrics.batched_queries.inc(size)

    def item_cache(self) -> ItemCache:
        """Where the pair models' item inputs live: files beside the space, memory-mapped and shared by the
        worker processes (`ITEM_CACHE_FILES`), or this process's memory."""
        s = self.settings
        directory = s.space_dir / ITEM_INPUTS_DIR if s.item_cache_files else None
        return ItemCache(directory, s.item_cache_dtype)

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def active(self) -> dict[str, int]:
        """The active version of every name (including names that do not fit the served space)."""
        return dict(self._active)

    @property
    def config_path(self) -> Path:
        return self.settings.home / CONFIG_FILE

    @property
    def config(self) -> CascadeConfig:
        """The default cascades as configured (what is shared with other replicas); the snapshot's own config is
        this one cut down to the models that load."""
        if self._config is None:
            return self.require_snapshot().config
        return self._config

    @property
    def faults(self) -> dict[str, Fault]:
        """The active registry entries the current snapshot could not load, by name."""
        snapshot = self._snapshot
        return dict(self._degraded.get(snapshot.id, ({}, {}))[0]) if snapshot is not None else {}

    def warnings_for(self, snapshot: Snapshot, kind: str) -> list[str]:
        """What an answer of this target kind (`classifier`, `pair`) on this snapshot must say about fallbacks."""
        return list(self._degraded.get(snapshot.id, ({}, {}))[1].get(kind, []))

    # -- loading and swapping ----------------------------------------------------------------------------------
    def load(self) -> Snapshot:
        """Build a snapshot from disk and make it current; readers holding the old one keep it. A broken registry
        entry does not stop it (`service/degraded.py`): only a space, an index or a dense classifier that
        cannot be read does. A worker forked with a home its supervisor read (`preloaded`) serves that one, unless
        the home's files changed since."""
        with self.lock:
            home, self._preloaded = self._preloaded, None
            read_before = home is not None and home.fingerprint == home_fingerprint(self.settings)
            if not read_before:
                home = self.read_home()
            snapshot = home.snapshot
            self._active, self._unreadable, self._config = dict(home.active), dict(home.unreadable), home.config
            self._degraded[snapshot.id] = home.degraded
            self._swap(snapshot, "load")
            self.log_misfits(snapshot)
        log.info(
            "snapshot %s loaded%s: %s",
            snapshot.id,
            " (the home as the parent read it before forking)" if read_before else "",
            ", ".join(f"{v.name}:{v.version}" for v in snapshot.variants.values()),
        )
        self.loaded.set()
        return snapshot

    def read_home(self) -> LoadedHome:
        """Everything `load` reads from disk, built into a snapshot that is not served yet: no item inputs built,
        no exact table asked for, no thread started. The supervisor of forked workers reads it once before it
        forks (`service/preload.py`), so that the workers share its pages."""
        fingerprint = home_fingerprint(self.settings)  # before reading: a change during the read is a change
        config = CascadeConfig.load(self.config_path)
        space_dir = self.settings.space_dir
        space = Space.load(space_dir)
        active, self._unreadable = self._read_active()
        snapshot = self._build(
            space,
            ClusterIndex.load(space_dir),
            EmbeddingIndex.load(space_dir),
            QuerySet.load(space_dir),
            self.item_cache(),
            active,
            config,
            None,
            None,
        )
        return LoadedHome(snapshot, active, dict(self._unreadable), config, self._degraded[snapshot.id], fingerprint)

    def report_bootstrap(self, done: int, total: int, what: str) -> None:
        """Progress of a bootstrap running before the first load (shown by /healthz and /readyz, and logged)."""
        previous = self.bootstrap_progress
        self.bootstrap_progress = {"done": done, "total": total, "step": what}
        if previous is None or previous.get("step") != what or done == total:  # one line per step
            log.info("bootstrap %d/%d: %s", done, total, what, extra={"bootstrap": self.bootstrap_progress})

    def load_early(self) -> None:
        """Load what a running bootstrap has built so far (it goes on afterwards). Should that fail, the bootstrap
        still goes on, and the load after it reports why: a half-built home is never removed for it."""
        try:
            self.load()
        except Exception:
            log.exception("loading the home before its bootstrap ended failed: it is loaded again when it ends")

    def load_in_background(self, before: Callable[[], None] | None = None) -> threading.Thread:
        """Load the snapshot in a thread, after `before` (the first run's bootstrap), so that the port is open
        and /healthz answers from the start."""

        def run() -> None:
            step = "the bootstrap"
            try:
                if before is not None:
                    before()  # may load a first snapshot itself (a bootstrap that can answer before it ends)
                    self.bootstrap_progress = None
                step = "loading the snapshot"
                self.load()
            except Exception as exc:  # readiness reports it; the process stays up for operators to inspect
                self.load_error = f"{type(exc).__name__}: {exc}"
                if self.snapshot is not None:  # loaded early: it goes on answering (FAISS alone, exact labels)
                    log.exception("%s failed; the snapshot loaded before it is still served", step)
                else:
                    log.exception("%s failed", step)
            finally:
                self.settled.set()

        thread = threading.Thread(target=run, name="snapshot-loader", daemon=True)
        thread.start()
        return thread

    def _read_active(self) -> tuple[dict[str, int], dict[str, str]]:
        """The active version of every name, and the names whose ACTIVE file does not read (with why)."""
        active: dict[str, int] = {}
        unreadable: dict[str, str] = {}
        for name in self.registry.names():
            try:
                version = self.registry.active_version(name)
            except (BrokenEntryError, OSError) as exc:
                unreadable[name] = str(exc)
                continue
            if version is not None:
                active[name] = version
        return active, unreadable

    def _variant(self, name: str, version: int, space: Space, current: Snapshot | None) -> Variant | None:
        """`name:version` ready to serve (reused from `current` when unchanged), or None when it does not fit the
        space. Raises whatever reading it raises."""
        old = current.variants.get(name) if current is not None else None
        if old is not None and old.version == version and old.gadget_sha256 == self._gadget_digest(name, version):
            return old
        if misfit(self.registry.manifest(name, version), space) is not None:
            return None
        return variant_for(self.registry.load(name, version), space)

    def _build(
        self,
        space: Space,
        index: ClusterIndex,
        embedding: EmbeddingIndex | None,
        queries: QuerySet | None,
        item_cache: ItemCache | None,
        active: Mapping[str, int],
        config: CascadeConfig,
        current: Snapshot | None,
        strict: str | None,
        as_given: bool = False,
        reader_from_disk: bool = False,
    ) -> Snapshot:
        """A complete snapshot for `active` + `config`. An entry that does not load is a fault: its previous good
        version is served if one loads, and the default cascades lose the stages that cannot run. `strict` names
        the model being changed: its failure (or misfit) is raised, not worked around; `as_given`: the config must
        run exactly as given (a cascade set by hand), else RequestError."""
        variants: dict[str, Variant] = {}
        faults: dict[str, Fault] = {}
        broken: dict[str, tuple[int | None, str]] = {
            n: (None, e) for n, e in self._unreadable.items() if n not in active
        }
        for name, version in sorted(active.items()):
            if name == strict:
                reason = misfit(self.registry.manifest(name, version), space)
                if reason is not None:
                    raise RequestError("version", f"{name}:{version} {reason}")
            try:
                variant = self._variant(name, version, space, current)
            except Exception as exc:  # any unreadable entry is a fault to work around, not a crash
                if name == strict:
                    raise
                broken[name] = (version, f"{type(exc).__name__}: {exc}"[:400])
                continue
            if variant is not None:
                variants[name] = variant
        for name, (version, error) in sorted(broken.items()):
            served = None
            for candidate in fallback_versions(self.registry, name, version):
                try:
                    variant = self._variant(name, candidate, space, current)
                except Exception:  # the next older version is tried
                    continue
                if variant is not None:
                    variants[name], served = variant, candidate
                    break
            faults[name] = Fault(name, version, error, served)
        if as_given:
            described = [f.describe() for f in faults.values()]
            served_config, warnings = config, {"classifier": described, "pair": list(described)}
        else:
            served_config, warnings = servable_config(config, variants, faults)
        # the cluster reader is read from disk with the space and at a reload that finds it changed, and kept
        # across model swaps
        if current is not None and not reader_from_disk:
            reader = current.reader
        elif embedding is None:
            reader = None
        else:
            reader = served_reader(self.settings.space_dir, space)
            if reader is None and current is not None and stored_digest(self.settings.space_dir) is not None:
                reader = current.reader  # a new reader that does not load (logged): the one being served stays
        if served_config.reader is not None:  # the reader's check judged at the confidence this service asks for
            checked, note = at_confidence(served_config.reader, self.settings.reader_confidence)
            served_config = served_config.model_copy(update={"reader": checked})
            if note and reader is not None and reader.sha256 == checked.sha256:
                warnings = {**warnings, "pair": [*warnings["pair"], note]}
        snapshot = build_snapshot(space, index, variants, served_config, embedding, queries, item_cache, reader)
        self._degraded[snapshot.id] = (faults, warnings)
        return snapshot

    def _swap(self, snapshot: Snapshot, reason: str) -> None:
        snapshot.warm()  # pair models' item inputs built before the snapshot serves (a no-op for classifiers)
        previous = self._snapshot
        self._snapshot = snapshot  # one reference assignment: readers see the old or the new, never a mix
        if previous is None or previous.id != snapshot.id:
            self.metrics.swaps.labels(reason=reason).inc()
        self.exact.request(snapshot)  # non-blocking: a new dense version or space gets its table built
        self.metrics.set_active(
            {v.name: (v.version, v.manifest.sha256) for v in snapshot.variants.values()}, snapshot.id
        )
        faults, _ = self._degraded.get(snapshot.id, ({}, {}))
        self.metrics.set_broken([(f.name, f.version) for f in faults.values()])
        for fault in faults.values():
            key = (fault.name, fault.version, fault.served_version)
            if key not in self._faults_logged:
                self._faults_logged.add(key)
                log.error("registry entry %s", fault.describe())
        keep = {snapshot.id} | ({previous.id} if previous is not None else set())
        for old_id in list(self._degraded)[:-8]:  # a few recent ones stay: queries may still hold them
            if old_id not in keep:
                del self._degraded[old_id]

    # -- exact answers (cascade/exact.py): built in the background after every swap ------------------------------
    def exact_table(self, snapshot: Snapshot) -> ExactTable | None:
        """The table of this snapshot's dense checkpoint and space if it is ready, else None (the query then runs
        the cascade). Never blocks, never returns a table of another dense version."""
        return self.exact.get(snapshot)

    def exact_status(self, snapshot: Snapshot) -> dict:
        """For `/v1/space`: state (ready | building | disabled | failed), bytes, build_seconds, build_flops,
        lookup_flops, break_even_queries (build FLOPs over the FLOPs the default cascade spends per query)."""
        return self.exact.status(snapshot)

    def require_snapshot(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise ConflictError("models and index are still loading")
        return snapshot

    def candidate(
        self,
        active: Mapping[str, int],
        config: CascadeConfig,
        strict: str | None = None,
        as_given: bool = False,
        reader_from_disk: bool = False,
    ) -> Snapshot:
        """A complete snapshot for `active` + `config` on the current space, reusing already-loaded models.
        `strict` names a model that must load and fit the space (the one being activated); others that do not fit
        are left out, as at load, and broken ones are worked around (`_build`). `reader_from_disk`: the cluster
        reader is read again from beside the space instead of kept."""
        current = self.require_snapshot()
        return self._build(
            current.space,
            current.index,
            current.embedding,
            current.queries,
            current.item_cache,
            active,
            config,
            current,
            strict,
            as_given,
            reader_from_disk,
        )

    # -- changes (each: candidate first, then disk, then swap, then tell the other replicas) -------------------
    def activate(self, name: str, version: int | None = None, reason: str = "activate") -> Snapshot:
        with self.lock:
            versions = self.registry.versions(name)
            if not versions:
                raise RegistryError(f"unknown model {name!r}")
            version = max(versions) if version is None else version
            if version not in versions:
                raise RegistryError(f"model {name!r} has no version {version}")
            snapshot = self.candidate({**self._active, name: version}, self.config, strict=name)
            self.registry.activate(name, version)
            self._active[name] = version
            self._swap(snapshot, reason)
            self._changed(name)
        self._push()
        return snapshot

    def rollback(self, name: str) -> Snapshot:
        with self.lock:
            current_version = self._active.get(name)
            if current_version is None:
                raise RegistryError(
                    f"model {name!r} has no active version"
                    if self.registry.versions(name)
                    else f"unknown model {name!r}"
                )
            target = self.registry.rollback_target(name, current_version)
            if target is None:
                raise ConflictError(f"{name}:{current_version} has no earlier version to roll back to")
            snapshot = self.candidate({**self._active, name: target}, self.config, strict=name)
            self.registry.rollback(name, current_version, target)
            self._active[name] = target
            self._swap(snapshot, "rollback")
            self._changed(name)
        self._push()
        return snapshot

    def delete(self, name: str, version: int) -> None:
        with self.lock:
            if self._active.get(name) == version or self.registry.active_version(name) == version:
                raise ConflictError(f"{name}:{version} is active; activate another version first")
            snapshot = self._snapshot
            if snapshot is not None and (v := snapshot.variants.get(name)) is not None and v.version == version:
                raise ConflictError(f"{name}:{version} is being served; activate another version first")
            self.registry.entry_dir(name, version)  # RegistryError for an unknown one
            self.registry.delete(name, version)

    def set_cascade(self, config: CascadeConfig) -> Snapshot:
        with self.lock:
            snapshot = self.candidate(self._active, config, as_given=True)  # runs as given, or 422
            self._save_and_swap(config, snapshot, "cascade")
        self._push()
        return snapshot

    def serve_reader(self, choice: ReaderChoice | None) -> Snapshot:
        """Serve the cluster reader now stored beside the space under `choice`, its dev check: a complete snapshot
        with the reader read from disk, then cascade.json with the check, then the swap (`service.reader_admin`)."""
        with self.lock:
            config = self.config.model_copy(update={"reader": choice})
            snapshot = self.candidate(self._active, config, reader_from_disk=True)
            self._save_and_swap(config, snapshot, "reader")
        self._push()
        return snapshot

    def _save_and_swap(self, config: CascadeConfig, snapshot: Snapshot, reason: str) -> None:
        """A configuration change whose snapshot is built: cascade.json first, then the swap (under the lock)."""
        config.save(self.config_path)
        self._config = config
        self._swap(snapshot, reason)
        self._changed(None)

    def adopt(self, active: Mapping[str, int], config: CascadeConfig | None, generation: int | None = None) -> bool:
        """Converge on the shared state read while `generation` was current (a local change since then wins;
        it is being pushed). Names whose version is not in local storage yet are kept as they are (retried at
        the next reconcile). Returns whether anything changed."""
        with self.lock:
            if generation is not None and generation != self.generation:
                return False
            dirty_names, dirty_cascade = self.shared.dirty() if self.shared is not None else (set(), False)
            configured = self.config
            wanted = dict(self._active)
            for name, version in active.items():
                if name in dirty_names:
                    continue  # a local change not pushed yet wins over what Redis still says
                if version in self.registry.versions(name):
                    wanted[name] = version
                elif wanted.get(name) != version:
                    log.warning("shared state names %s:%s, not in local storage yet", name, version)
            config = configured if config is None or dirty_cascade else config
            if wanted == self._active and config == configured:
                return False
            current = self.require_snapshot()
            checked = config.reader.sha256 if config.reader is not None else None
            serving = current.reader.sha256 if current.reader is not None else None
            # another replica served a new reader: its files are beside the shared space, its check in the config
            snapshot = self.candidate(wanted, config, reader_from_disk=checked is not None and checked != serving)
            for name, version in wanted.items():
                if self.registry.active_version(name) != version:
                    self.registry.activate(name, version, record=False)
            if config != configured:
                config.save(self.config_path)
            self._active = wanted
            self._config = config
            self._swap(snapshot, "reconcile")
        log.info("converged on shared state: snapshot %s", snapshot.id)
        return True

    def _gadget_digest(self, name: str, version: int) -> str | None:
        try:
            return self.registry.gadget_digest(name, version)
        except RegistryError:
            return None

    def reload(self) -> tuple[Snapshot, list[str]]:
        """Adopt what the command line changed on disk while the server ran (`prunecascade train/prune/reader` into
        the served home: new versions, other active versions, a new default cascade, a new cluster reader), as one
        complete snapshot built before anything is swapped; models already loaded are reused. Returns the snapshot
        and what changed (`name:version`, `name:version gadget`, `cascade` or `reader`)."""
        with self.lock:
            current = self.require_snapshot()
            configured = self.config
            wanted, self._unreadable = self._read_active()
            config = CascadeConfig.load(self.config_path)
            new_gadgets = sorted(
                n
                for n, v in wanted.items()
                if self._active.get(n) == v
                and n in current.variants
                and current.variants[n].gadget_sha256 != self._gadget_digest(n, v)
            )
            serving = current.reader.sha256 if current.reader is not None else None
            new_reader = stored_digest(self.settings.space_dir) != serving  # (a broken one is retried, as faults)
            unchanged = wanted == self._active and config == configured and not new_gadgets
            if unchanged and not self.faults and not new_reader:
                return current, []  # (with faults, a reload also retries the broken entries)
            snapshot = self.candidate(wanted, config, reader_from_disk=new_reader)
            names = sorted({n for n, v in wanted.items() if self._active.get(n) != v} | (self._active.keys() - wanted))
            changed = [f"{n}:{wanted[n]}" if n in wanted else f"{n}: no active version" for n in names]
            changed += [f"{n}:{wanted[n]} gadget" for n in new_gadgets]
            names = sorted(set(names) | set(new_gadgets))
            if config != configured:
                changed.append("cascade")
            if (snapshot.reader.sha256 if snapshot.reader is not None else None) != serving:
                changed.append("reader")
            self._active = wanted
            self._config = config
            self._swap(snapshot, "reload")
            for name in names:
                self._changed(name)
            if config != configured:
                self._changed(None)
            self.log_misfits(snapshot)
        log.info("reloaded from disk: snapshot %s (%s)", snapshot.id, ", ".join(changed) or "no change")
        self._push()
        return snapshot, changed

    def log_misfits(self, snapshot: Snapshot) -> None:
        """Log, once per name and version, every active model that the space cannot serve and why."""
        for name, version in sorted(self._active.items()):
            if name in snapshot.variants or (name, version) in self._misfits_logged:
                continue
            try:
                reason = misfit(self.registry.manifest(name, version), snapshot.space)
            except RegistryError as exc:
                reason = str(exc)
            if reason is not None:
                self._misfits_logged.add((name, version))
                log.warning("%s:%s is active but not served: it %s", name, version, reason)

    def _changed(self, name: str | None) -> None:
        """Called under the lock by every local change: remembered as dirty (for Redis) in the same step."""
        self.generation += 1
        if self.shared is not None:
            self.shared.mark_dirty(name)

    def _push(self) -> None:
        if self.shared is not None:
            self.shared.push()
