"""What a bootstrap leaves in its home besides the artefacts: `bootstrap.json`, which says what the run was built
from (written when the run starts, so that a run interrupted half-way is never resumed with other data, and
completed at the end), and nothing at all when a run into a fresh home fails."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cascade.bootstrap_config import BootstrapConfig
    from models.data import Splits

__all__ = ["RECORD_FILE", "describe_run", "read_record", "write_record", "nothing_left_on_failure", "grades_line"]

RECORD_FILE = "bootstrap.json"


def describe_run(config: BootstrapConfig, splits: Splits | None, grades: dict[str, Any] | None) -> dict[str, Any]:
    """The settings that shaped this run, and only those: MNIST-1D's sample count and prototype spaces, the
    cluster size of same-label clusters and the k of k-means appear only where they were used."""
    record = asdict(config)
    builtin = config.dataset in ("mnist1d", "digits")
    prototypes = config.dataset == "mnist1d" and config.pair is not None
    if config.dataset != "mnist1d":
        record.pop("num_samples")  # MNIST-1D's generated size
    given = splits is not None and splits.served.cluster is not None
    if prototypes or given or config.kmeans_clusters > 0:
        record.pop("cluster_size")  # only same-label clusters have one
    if prototypes or given or config.kmeans_clusters == 0:
        record.pop("kmeans_clusters")
    if record.get("pair") is not None and not prototypes:  # a user's clusters: no prototype space was rendered
        for key in ("space", "train"):
            record["pair"].pop(key)
    if builtin:
        record.pop("user_pair")
        record.pop("space_dataset")
    if grades is not None:
        record["grades"] = grades
    return record


def read_record(home: Path) -> dict[str, Any] | None:
    """The home's record, or None when no run has started there."""
    path = home / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(home: Path, record: dict[str, Any], state: str) -> None:
    """`state`: `building` (the run has started: its data is now this home's) or `complete`."""
    tmp = home / f".{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps({"state": state, **record}, indent=2, default=str))
    tmp.replace(home / RECORD_FILE)


@contextmanager
def nothing_left_on_failure(home: Path) -> Iterator[None]:
    """A run into a fresh home (missing or empty) that fails with an error removes what it wrote, so that no
    half-built home (say an empty `registry/`) is taken for a fresh one later. An interrupt (Ctrl-C) keeps what
    was built: the next run resumes it, and `bootstrap.json` (state `building`) ties it to its data."""
    existed = home.exists()
    fresh = not existed or (home.is_dir() and not any(home.iterdir()))
    try:
        yield
    except Exception:
        if fresh and home.is_dir():
            if existed:
                for child in home.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            else:
                shutil.rmtree(home)
        raise


def grades_line(record: dict[str, Any]) -> str | None:
    """One line on the relevance grades a run chose (None: no pair models)."""
    grades = record.get("grades")
    if grades:
        return f"relevance grades: {grades['decision']}; default gains {grades['gains']}"
    if record.get("dataset") == "mnist1d" and record.get("pair"):
        return "relevance grades: three (2 own prototype, 1 same label, 0 other), built into the prototype space"
    return None
