"""Shared helpers for the cascade, HTTP, compute and throughput benchmarks (not tests).

The benchmark home (default /tmp/bench-home, never committed) holds the embedded default models plus the more
aggressively pruned `cnn-s10`, `cnn-s10f` and `cnn-s10g` (10% of units; `layer-weight-norm` fine-tuned 3 and
20 epochs, `greedy-asymmetric` fine-tuned 20), and two spaces of
>= 100,000 MNIST-1D items generated locally with another seed than the training data, so no item was trained on:

- `big`:  every label owns ~1,160 clusters of 10 (the common-target regime);
- `rare`: 10,000 clusters of 10, of which the rare label owns 20 (0.2%) and the other labels the rest.

Every speed number the scripts print is a ratio of two things measured side by side in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cascade.ranking_metrics import median, percentile  # one definition (re-exported for the scripts)

__all__ = [
    "seconds_per_call",
    "DEFAULT_HOME",
    "BIG_SPACE",
    "RARE_SPACE",
    "prepare_home",
    "load_snapshot_from",
    "set_threads",
    "median",
    "percentile",
    "serve",
    "wait_ready",
    "parse_ints",
    "dump_json",
    "done_keys",
]

DEFAULT_HOME = Path("/tmp/bench-home")
BIG_SPACE = "big"
RARE_SPACE = "rare"
EXTRA_VARIANTS = (  # name, method, keep, reweight, fine-tuning epochs, calibration items
    ("cnn-s10", "layer-weight-norm", 0.1, True, 3, 512),  # as the brief's example command
    ("cnn-s10f", "layer-weight-norm", 0.1, True, 20, 512),  # the same size, fine-tuned longer
    ("cnn-s10g", "greedy-asymmetric", 0.1, True, 20, 1024),  # the same size, the papers' greedy selection
)


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def seconds_per_call(fn: Callable[[], object], min_seconds: float = 0.2) -> float:
    """Seconds per call, repeating the call until `min_seconds` have passed (at least once)."""
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return elapsed / calls


def set_threads(n: int) -> None:
    """Same intra-op thread count for everything compared in one run (the service's default is 1)."""
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except Exception:  # pragma: no cover - faiss without OpenMP
        pass


def _space_dir(home: Path, name: str) -> Path:
    return home / "spaces" / name


def write_space(directory: Path, x: np.ndarray, y: np.ndarray, prior: np.ndarray, cluster: np.ndarray, meta: dict):
    from cascade.index import ClusterIndex
    from cascade.space import build_space

    space = build_space(x, y, prior, cluster, meta)
    directory.mkdir(parents=True, exist_ok=True)
    ClusterIndex.build(space).save(directory)
    space.save(directory)  # last: marks the space complete
    return space


def prepare_home(
    home: Path,
    epochs: int = 10,
    big_samples: int = 120_000,
    big_seed: int = 101,
    rare_label: int = 3,
    rare_relevant: int = 20,
    rare_clusters: int = 10_000,
    cluster_size: int = 10,
    rare_name: str = RARE_SPACE,
    big_name: str = BIG_SPACE,
) -> None:
    """Build whatever is missing: default models (dense trained for `epochs`), cnn-s10, the big and rare spaces."""
    from cascade.bootstrap import bootstrap
    from cascade.bootstrap_config import BootstrapConfig
    from cascade.space import META_FILE, SPACE_FILE, clusters_by_label
    from models.data import load_dataset
    from models.pruning.pipeline import prune_and_register
    from models.registry import ModelRegistry

    config = BootstrapConfig(epochs=epochs)
    bootstrap(home, config, progress=True)
    registry = ModelRegistry(home / "registry")
    train = load_dataset("mnist1d", seed=config.seed, num_samples=config.num_samples, cache_dir=home / "data")
    for name, method, keep, reweight, finetune, calibration in EXTRA_VARIANTS:
        if registry.active_version(name) is None:
            m = prune_and_register(
                registry,
                "dense",
                method,
                keep,
                name,
                train,
                reweight=reweight,
                finetune_epochs=finetune,
                calibration_size=calibration,
                progress=True,
            )
            print(f"registered {m.ref}: accuracy {m.accuracy:.4f}, FLOPs {m.flops_nonzero:,}", flush=True)

    # Items from another MNIST-1D generation (seed big_seed): 97% of it lands in the pool, none was trained on.
    big = load_dataset(
        "mnist1d", seed=big_seed, num_samples=big_samples, fractions=(0.01, 0.01, 0.01), cache_dir=home / "data"
    )
    x, y = big.x_pool, big.y_pool
    prior = train.prior  # the class frequencies the models were trained with
    rng = np.random.default_rng(big_seed)
    big_dir = _space_dir(home, big_name)
    if not all((big_dir / f).exists() for f in (SPACE_FILE, META_FILE)):
        cluster = clusters_by_label(y, cluster_size, rng)
        meta = {"id": f"bench-big-s{big_seed}-n{len(y)}", "dataset": "mnist1d", "clusters": "same-label"}
        space = write_space(big_dir, x, y, prior, cluster, meta)
        print(f"big space: {space.num_items:,} items, {space.num_clusters:,} clusters", flush=True)

    rare_dir = _space_dir(home, rare_name)
    if not all((rare_dir / f).exists() for f in (SPACE_FILE, META_FILE)):
        classes = int(y.max()) + 1
        others = [c for c in range(classes) if c != rare_label]
        per_other = np.full(len(others), (rare_clusters - rare_relevant) // len(others))
        per_other[: (rare_clusters - rare_relevant) - per_other.sum()] += 1
        want = {rare_label: rare_relevant, **{c: int(n) for c, n in zip(others, per_other, strict=True)}}
        pick = []
        for c, n in want.items():
            idx = rng.permutation(np.flatnonzero(y == c))[: n * cluster_size]
            if len(idx) < n * cluster_size:
                raise ValueError(f"label {c} has {len(idx)} items, needs {n * cluster_size}: raise --big-samples")
            pick.append(idx)
        idx = np.concatenate(pick)
        cluster = clusters_by_label(y[idx], cluster_size, rng)
        meta = {
            "id": f"bench-rare-l{rare_label}-r{rare_relevant}-k{rare_clusters}-s{big_seed}",
            "dataset": "mnist1d",
            "clusters": "same-label",
            "rare_label": rare_label,
        }
        space = write_space(rare_dir, x[idx], y[idx], prior, cluster, meta)
        print(
            f"rare space: {space.num_items:,} items, {space.num_clusters:,} clusters, "
            f"label {rare_label} owns {int((space.cluster_labels == rare_label).sum())}",
            flush=True,
        )


def load_snapshot_from(home: Path, space: str, stages: tuple | None = None):
    """The snapshot the service would serve for HOME/spaces/SPACE (optionally with another default stage list)."""
    from cascade.config import CONFIG_FILE, CascadeConfig
    from cascade.snapshot import load_snapshot
    from models.registry import ModelRegistry

    config = CascadeConfig.load(home / CONFIG_FILE)
    if stages is not None:
        config = config.model_copy(update={"stages": stages})
    return load_snapshot(ModelRegistry(home / "registry"), _space_dir(home, space), config)


def wait_ready(url: str, timeout_s: float = 180.0, consecutive: int = 1) -> None:
    """Poll /readyz (bounded in time) until `consecutive` answers in a row say the snapshot is loaded; with
    several workers each answer may come from another worker, so ask for more than one."""
    import httpx

    deadline = time.monotonic() + timeout_s
    streak = 0
    while time.monotonic() < deadline:
        try:
            ok = httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            ok = False
        streak = streak + 1 if ok else 0
        if streak >= consecutive:
            return
        time.sleep(0.05 if ok else 0.25)
    raise TimeoutError(f"{url} not ready within {timeout_s}s")


@contextmanager
def serve(
    home: Path,
    space: str,
    port: int,
    workers: int = 1,
    torch_threads: int = 1,
    omp_threads: int | None = None,
    log: Path | None = None,
    cache: bool = False,
    tree: Path | None = None,
) -> Iterator[str]:
    """uvicorn on 127.0.0.1 only, as the deployment runs it (`--factory --workers N`); stopped by its own pid.
    The result cache is off by default: a benchmark must measure every query, not a cache hit. With `tree`, the
    server runs the code of that checkout instead of this one (to compare two versions side by side)."""
    if not 1 <= port <= 65535:
        raise ValueError("port")
    env = {
        **os.environ,
        "PRUNECASCADE_HOME": str(home),
        "PRUNECASCADE_SPACE": space,
        "PRUNECASCADE_TORCH_THREADS": str(torch_threads),
        "PRUNECASCADE_LOG_LEVEL": "warning",
        "PRUNECASCADE_CACHE_ENABLED": "true" if cache else "false",
    }
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)  # FAISS's OpenMP pool (torch's is set explicitly)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        with uvicorn_process(port, workers, env, out, cwd=tree, ready_per_worker=30) as (url, _):
            yield url
    finally:
        if log:
            out.close()


@contextmanager
def uvicorn_process(
    port: int,
    workers: int,
    env: dict[str, str],
    stdout,
    cwd: Path | None = None,
    ready_per_worker: int = 30,
    forked: bool = False,
    command: list[str] | None = None,
) -> Iterator[tuple[str, int]]:
    """uvicorn on 127.0.0.1 only, with exactly `env`: uvicorn's own command (`--factory --workers N`, every worker
    a fresh interpreter), or with `forked` `prunecascade serve --workers N` (workers forked from one parent that
    imported the service, service/workers.py), or any other `command` that serves `port` with N workers. Yields (url,
    pid) once ready (with several workers: `ready_per_worker` x N consecutive ready answers, so every worker has
    loaded), and stops it by its own pid."""
    if command is not None:
        cmd = command
    elif forked:
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--workers", str(workers)]
    else:
        cmd = [
            str(Path(sys.executable).with_name("uvicorn")),
            "service.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, consecutive=1 if workers == 1 else ready_per_worker * workers)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def dump_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float))


def done_keys(path: Path, fields: tuple[str, ...]) -> set[tuple]:
    """The rows already written to a JSON-lines results file, as tuples of `fields`: a resumed run skips them."""
    if not path.exists():
        return set()
    return {tuple(json.loads(line)[f] for f in fields) for line in path.read_text().splitlines() if line.strip()}
