"""Settings from the environment (`PRUNECASCADE_*`), one object passed to everything that needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.cpus import usable_cpus

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRUNECASCADE_", extra="ignore")

    home: Path = Field(Path("var"), description="Registry, spaces, datasets and cascade config live here")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    space: str = Field("default", description="Name of the space to serve (a directory under HOME/spaces)")
    # -- bounded cost and fair sharing of /v1/query --------------------------------------------------------------
    query_timeout_s: float = Field(
        10.0, gt=0.0, description="server-side deadline of a query, queueing included: 504 when it passes"
    )
    max_concurrent_queries: int = Field(4, ge=1, description="queries computed at once; more wait in the queue")
    max_queued_queries: int = Field(
        32, ge=0, description="queries waiting for a slot; beyond it: 503 with Retry-After at once"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503 from a full queue")
    reserved_slots: int = Field(
        1,
        ge=0,
        description="compute slots heavy queries may not take (they hold at most MAX_CONCURRENT_QUERIES minus "
        "this, at least 1), so a few worst-case queries cannot make every cheap one wait",
    )
    heavy_query_flops: int = Field(
        2_000_000_000,
        ge=0,
        description="a query whose stage plan may cost more FLOPs than this is heavy (the default cascades cost "
        "well under it; the bound is the cost budget's, from the request and the current snapshot)",
    )
    torch_threads: int = Field(
        default_factory=lambda data: max(1, usable_cpus() // data.get("max_concurrent_queries", 1)),
        ge=1,
        description="intra-op torch threads per query (queries run in parallel). Unset: the CPUs this process may "
        "use (its CPU affinity, os.sched_getaffinity, capped by the cgroup CPU quota: cpu.max, or "
        "cpu.cfs_quota_us / cpu.cfs_period_us) divided by MAX_CONCURRENT_QUERIES, at least 1; never the host's "
        "core count (os.cpu_count), which overcommits a container with a CPU limit",
    )
    # -- batching across concurrent queries, worker processes, the item cache ----------------------------------
    batching: bool = Field(
        True, description="concurrent queries with the same stages are computed as one batch (answers unchanged)"
    )
    batch_max_wait_ms: float = Field(
        5.0,
        ge=0.0,
        le=50.0,
        description="how long the first query of a batch waits for other queries by example already on their way "
        "(none on the way: it starts at once); never past its deadline",
    )
    batch_max_queries: int = Field(16, ge=1, le=256, description="queries per batch at most")
    max_batch_request_queries: int = Field(64, ge=1, description="queries in one POST /v1/query/batch at most")
    item_cache_files: bool = Field(
        True,
        description="keep the pair models' item inputs in files beside the space, memory-mapped read-only, so the "
        "worker processes share one copy (a read-only home falls back to memory)",
    )
    item_cache_dtype: Literal["float32", "float16"] = Field(
        "float32", description="float16 halves the item cache; answers move slightly (docs/operations.md)"
    )
    workers: int = Field(1, ge=1, le=64, description="server worker processes (`prunecascade serve`)")
    preload_home: bool = Field(
        True,
        description="with several workers, read the home and build its item tables once in their parent before "
        "forking them, so that they share the models, indexes and tables it loads (`service/preload.py`)",
    )
    malloc_arenas: int = Field(
        1,
        ge=0,
        description="with several workers, glibc malloc arenas per worker (0: glibc's default, 8 per core); one "
        "keeps a single set of freed query buffers per worker (`service/malloc_arenas.py`); MALLOC_ARENA_MAX, if "
        "set, wins",
    )
    train_reader: bool = Field(
        False,
        description="on a home with no cluster reader, train one in a background child process once the snapshot "
        "is loaded, then serve it if its dev check chooses it (`service/reader_training.py`; `make run` sets it)",
    )
    reader_training_steps: int = Field(48000, ge=1, description="training steps of that background reader")
    reader_training_first_steps: int = Field(
        4000,
        ge=0,
        description="a shorter reader trained, checked and served first (0, or not fewer than the steps: none), "
        "so that a first run's queries by example get most of the reader's gain in a quarter of the time",
    )
    reader_confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1.0,
        description="how sure a reader's dev check must be that it answers more dev queries better than worse "
        "than what it would replace, by recall@1 or nDCG@10 (a sign test; `cascade.config.READER_CONFIDENCE`); "
        "a reader checked at a lower confidence is judged again from the sign tests its check recorded",
    )
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_k: int = Field(1000, ge=1)
    max_examples: int = Field(64, ge=1, description="examples a query by example may have (422 beyond)")
    example_candidates: int = Field(
        200, ge=1, description="clusters the embedding index proposes for a query by example (stage 0's M)"
    )
    exact_enabled: bool = Field(
        True, description="answer label and utility targets from the dense cluster posteriors once built"
    )
    exact_max_bytes: int = Field(
        1 << 30, ge=0, description="largest exact table (clusters x classes x 4 bytes); beyond it, the cascade"
    )
    max_query_flops: int = Field(
        20_000_000_000,
        ge=1,
        description="cost budget per query, checked on the stage plan before anything runs (422 beyond it)",
    )
    # -- HTTP connections (uvicorn) ----------------------------------------------------------------------------
    header_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="a connection must send a complete request head this soon after opening (or "
        "after its previous response), else it is closed: slow-header and idle connections cannot pile up",
    )
    body_timeout_s: float = Field(30.0, gt=0.0, description="a request body must arrive this soon: 408 beyond")
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this long")
    max_connections: int = Field(
        1000, ge=1, description="open connections + in-flight requests beyond which uvicorn answers 503"
    )
    log_level: str = "info"
    log_json: bool = Field(True, description="one JSON object per log line, with the request id")

    # -- admin -------------------------------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(None, description="bearer token of the admin routes; unset: closed (403)")
    admin_token_file: Path | None = Field(None, description="file holding the admin token (used if no token)")
    max_upload_bytes: int = Field(64_000_000, ge=1024, description="largest checkpoint upload (413 beyond)")
    accuracy_floor: float = Field(0.0, ge=0.0, le=1.0, description="probe accuracy every upload must reach")
    relative_accuracy_floor: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="every upload must keep this fraction of the served dense model's probe accuracy above chance "
        "(the most frequent output's share; 0: off): refuses random weights whatever the absolute floor",
    )
    max_params: int = Field(
        20_000_000,
        ge=1,
        description="parameter budget of an uploaded network or gadget, checked from its spec before anything is "
        "allocated (the dense MNIST-1D cnn1d has 93,834)",
    )
    max_accuracy_drop: float | None = Field(
        0.05, ge=0.0, le=1.0, description="largest probe-accuracy drop from the active version of the same name"
    )
    flops_tolerance: float = Field(0.0, ge=0.0, description="relative slack allowed on a manifest's FLOPs claim")

    # -- cache and Redis ---------------------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="enables the shared cache and registry state")
    redis_prefix: str = Field("prunecascade", min_length=1, description="namespace of every Redis key")
    redis_timeout_s: float = Field(0.25, gt=0.0, description="socket timeout: a slow Redis counts as down")
    redis_retry_s: float = Field(1.0, ge=0.0, description="after a Redis error, skip Redis this long")
    reconcile_interval_s: float = Field(5.0, gt=0.0, description="replicas re-read the shared state this often")
    cache_enabled: bool = Field(True, description="off for benchmarks that must measure every query")
    cache_ttl_s: int = Field(300, ge=1)
    cache_max_entries: int = Field(4096, ge=1, description="size of the in-process cache (no Redis)")
    cache_fallback_entries: int = Field(
        1024, ge=1, description="with Redis: size of the in-process copy that answers while Redis is down"
    )

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def spaces_dir(self) -> Path:
        return self.home / "spaces"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def space_dir(self) -> Path:
        return self.spaces_dir / self.space

    def token_was_stripped(self) -> bool:
        """The configured token had surrounding whitespace (a trailing newline from `$(cat file)`, a stray
        space): it could never be sent in a header, so it is stripped, and the app logs that once."""
        if self.admin_token is None:
            return False
        raw = self.admin_token.get_secret_value()
        return raw != raw.strip()

    def resolved_admin_token(self) -> str | None:
        """The token from the environment, else from the token file; None keeps the admin routes closed."""
        if self.admin_token is not None and self.admin_token.get_secret_value().strip():
            return self.admin_token.get_secret_value().strip()
        if self.admin_token_file is not None and self.admin_token_file.is_file():
            token = self.admin_token_file.read_text().strip()
            return token or None
        return None
