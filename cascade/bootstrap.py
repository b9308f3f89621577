"""The embedded default: MNIST-1D generated locally, a dense CNN, pruned variants, a space of held-out items
with its index, and the default cascade. Every step is skipped when its artefact already exists, so a second
run is ready in seconds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cascade.config import CONFIG_FILE, CascadeConfig, Stage
from cascade.index import INDEX_FILE, ClusterIndex
from cascade.space import META_FILE, SPACE_FILE, build_space, clusters_by_kmeans, clusters_by_label
from models.data import Splits, load_dataset
from models.dense import default_spec, train_and_register
from models.pruning.pipeline import prune_and_register
from models.registry import ModelRegistry
from models.training import TrainConfig

__all__ = ["BootstrapConfig", "PrunedVariant", "bootstrap", "space_is_built", "build_space_dir"]

PROBE_FILE = "probe.npz"


@dataclass(frozen=True)
class PrunedVariant:
    name: str
    method: str
    keep: float
    reweight: bool = False
    finetune_epochs: int = 0


@dataclass(frozen=True)
class BootstrapConfig:
    dataset: str = "mnist1d"
    num_samples: int = 52_000
    seed: int = 0
    arch: str = "cnn1d"
    epochs: int = 40
    cluster_size: int = 10
    kmeans_clusters: int = 0  # > 0: partition the pool by FAISS k-means instead of same-label clusters
    variants: tuple[PrunedVariant, ...] = (
        PrunedVariant("cnn-s25", "greedy-asymmetric", 0.25, reweight=True, finetune_epochs=3),
        PrunedVariant("cnn-s50", "greedy-asymmetric", 0.5, reweight=True, finetune_epochs=3),
        PrunedVariant("cnn-m10", "magnitude", 0.1, finetune_epochs=3),
    )
    stages: tuple[Stage, ...] = (
        Stage(variant="cnn-s25", samples=2, keep=200, aggregator="bayes"),
        Stage(variant="cnn-s50", samples=4, keep=40, aggregator="bayes"),
        Stage(variant="dense", samples=10, aggregator="bayes"),
    )
    dense_name: str = "dense"


def space_is_built(space_dir: Path) -> bool:
    return all((space_dir / f).exists() for f in (SPACE_FILE, META_FILE, INDEX_FILE, PROBE_FILE))


def build_space_dir(space_dir: Path, splits: Splits, config: BootstrapConfig) -> None:
    """The space is the held-out pool; the probe set (test split) lets an operator gate new checkpoints."""
    rng = np.random.default_rng(config.seed)
    if splits.cluster_pool is not None:
        cluster, how = splits.cluster_pool, "given"
    elif config.kmeans_clusters > 0:
        cluster, how = clusters_by_kmeans(splits.x_pool, config.kmeans_clusters, config.seed), "kmeans"
    else:
        cluster, how = clusters_by_label(splits.y_pool, config.cluster_size, rng), "same-label"
    meta = {
        "id": f"{splits.name}-s{config.seed}-n{len(splits.x_pool)}-{how}",
        "dataset": splits.name,
        "clusters": how,
        "cluster_size": config.cluster_size,
        "seed": config.seed,
    }
    space = build_space(splits.x_pool, splits.y_pool, splits.prior, cluster, meta)
    space_dir.mkdir(parents=True, exist_ok=True)
    np.savez(space_dir / PROBE_FILE, x=splits.x_test, y=splits.y_test)
    ClusterIndex.build(space).save(space_dir)
    space.save(space_dir)  # written last: its presence marks a complete space


def bootstrap(home: Path, config: BootstrapConfig = BootstrapConfig(), progress: bool = True) -> CascadeConfig:
    """Build whatever of the embedded default is missing under `home`; returns the default cascade."""
    registry = ModelRegistry(home / "registry")
    space_dir = home / "spaces" / "default"
    config_path = home / CONFIG_FILE
    steps = tqdm(total=4 + len(config.variants), desc="bootstrap", disable=not progress)

    steps.set_postfix_str(f"data: {config.dataset}")
    splits = load_dataset(config.dataset, seed=config.seed, num_samples=config.num_samples, cache_dir=home / "data")
    steps.update()

    if registry.active_version(config.dense_name) is None:
        steps.set_postfix_str(f"training {config.dense_name}")
        spec = default_spec(splits, config.arch)  # type: ignore[arg-type]
        train_config = TrainConfig(epochs=config.epochs, seed=config.seed, progress=progress)
        data_args = {"seed": config.seed, "num_samples": config.num_samples}
        train_and_register(registry, config.dense_name, spec, splits, train_config, data_args)
    steps.update()

    for v in config.variants:
        if registry.active_version(v.name) is None:
            steps.set_postfix_str(f"pruning {v.name} ({v.method}, keep {v.keep})")
            prune_and_register(
                registry,
                config.dense_name,
                v.method,
                v.keep,
                v.name,
                splits,
                reweight=v.reweight,
                finetune_epochs=v.finetune_epochs,
                seed=config.seed,
                progress=progress,
            )
        steps.update()

    if not space_is_built(space_dir):
        steps.set_postfix_str("building space and FAISS index")
        build_space_dir(space_dir, splits, config)
    steps.update()

    if not config_path.exists():
        CascadeConfig(stages=config.stages, dense=config.dense_name).save(config_path)
        (home / "bootstrap.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    steps.update()
    steps.close()
    return CascadeConfig.load(config_path)
