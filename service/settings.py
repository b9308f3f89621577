"""Settings from the environment (`PRUNECASCADE_*`), one object passed to everything that needs it."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
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
    example_candidates: int = Field(256, ge=1, description="clusters the index proposes for a query by example")
    log_level: str = "info"

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
