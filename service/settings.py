"""Settings from the environment (`PRUNECASCADE_*`), one object passed to everything that needs it."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRUNECASCADE_", extra="ignore")

    home: Path = Field(Path("var"), description="Registry, spaces, datasets and cascade config live here")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    space: str = Field("default", description="Name of the space to serve (a directory under HOME/spaces)")
    torch_threads: int = Field(1, ge=1, description="Intra-op threads per query; requests run in parallel")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_k: int = Field(1000, ge=1)
    max_examples: int = Field(64, ge=1)
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
    log_level: str = "info"
    log_json: bool = Field(True, description="one JSON object per log line, with the request id")

    # -- admin -------------------------------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(None, description="bearer token of the admin routes; unset: closed (403)")
    admin_token_file: Path | None = Field(None, description="file holding the admin token (used if no token)")
    max_upload_bytes: int = Field(64_000_000, ge=1024, description="largest checkpoint upload (413 beyond)")
    accuracy_floor: float = Field(0.0, ge=0.0, le=1.0, description="probe accuracy every upload must reach")
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

    def resolved_admin_token(self) -> str | None:
        """The token from the environment, else from the token file; None keeps the admin routes closed."""
        if self.admin_token is not None and self.admin_token.get_secret_value():
            return self.admin_token.get_secret_value()
        if self.admin_token_file is not None and self.admin_token_file.is_file():
            token = self.admin_token_file.read_text().strip()
            return token or None
        return None
