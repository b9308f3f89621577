"""The service's one piece of mutable state: the current snapshot, replaced whole under a lock."""

from __future__ import annotations

import logging
import threading

from cascade.config import CONFIG_FILE, CascadeConfig
from cascade.snapshot import Snapshot, load_snapshot
from models.registry import ModelRegistry
from service.settings import Settings

__all__ = ["ServiceState"]

log = logging.getLogger("prunecascade")


class ServiceState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.registry_dir)
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()
        self.load_error: str | None = None

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def load(self) -> Snapshot:
        """Build a snapshot from disk and make it current; readers holding the old one keep it."""
        config = CascadeConfig.load(self.settings.home / CONFIG_FILE)
        snapshot = load_snapshot(self.registry, self.settings.space_dir, config)
        with self._lock:
            self._snapshot = snapshot
        log.info(
            "snapshot %s loaded: %s",
            snapshot.id,
            ", ".join(f"{v.name}:{v.version}" for v in snapshot.variants.values()),
        )
        return snapshot

    def load_in_background(self) -> threading.Thread:
        def run() -> None:
            try:
                self.load()
            except Exception as exc:  # readiness reports it; the process stays up for operators to inspect
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.exception("loading the snapshot failed")

        thread = threading.Thread(target=run, name="snapshot-loader", daemon=True)
        thread.start()
        return thread
