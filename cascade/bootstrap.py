"""The embedded default: MNIST-1D generated locally, a dense CNN, pruned variants, a space of held-out items
with its index, and the default cascade. Every step is skipped when its artefact already exists, so a second
run is ready in seconds."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cascade.config import CONFIG_FILE, CascadeConfig, Stage
from cascade.embedding import EmbeddingIndex
from cascade.index import INDEX_FILE, ClusterIndex
from cascade.queries import QuerySet
from cascade.space import META_FILE, SPACE_FILE, build_space, clusters_by_kmeans, clusters_by_label
from models.biencoder import BiEncoderTrainConfig, train_biencoder
from models.data import Splits, load_dataset
from models.dense import default_spec, train_and_register
from models.pair import default_pair_spec
from models.pair_training import PairTrainConfig, pair_accuracy, train_pair_model
from models.prototypes import PrototypeConfig, PrototypeSet, make_prototype_set, make_queries
from models.pruning.pair import probe_pairs, prune_pair_and_register
from models.pruning.pipeline import prune_and_register
from models.registry import ModelRegistry
from models.training import TrainConfig

__all__ = [
    "BootstrapConfig",
    "PairConfig",
    "PrunedVariant",
    "PrunedPairVariant",
    "bootstrap",
    "space_is_built",
    "build_space_dir",
    "variant_name",
    "default_variants",
    "default_stages",
]

PROBE_FILE = "probe.npz"
PAIR_PROBE_FILE = "pair_probe.npz"


@dataclass(frozen=True)
class PrunedPairVariant:
    name: str
    method: str
    keep: float
    reweight: bool = True
    finetune_steps: int = 0


@dataclass(frozen=True)
class PairConfig:
    """The query-by-example path of the embedded default: a space of MNIST-1D prototypes (clusters are views
    of one prototype, so the grade of a cluster for a query is constant on it), a bi-encoder for stage 0,
    a dense pair model and its pruned variants (issue 14)."""

    space: PrototypeConfig = PrototypeConfig(num_prototypes=2300)
    train: PrototypeConfig = PrototypeConfig(num_prototypes=4000)
    queries: int = 500
    biencoder: BiEncoderTrainConfig = BiEncoderTrainConfig()
    training: PairTrainConfig = PairTrainConfig()
    hidden: tuple[int, ...] = (256, 256)
    dense_name: str = "pair-dense"
    variants: tuple[PrunedPairVariant, ...] = (
        PrunedPairVariant("pair-s10", "greedy-asymmetric", 0.1, finetune_steps=300),
        PrunedPairVariant("pair-s30", "greedy-asymmetric", 0.3, finetune_steps=300),
    )
    stages: tuple[Stage, ...] = (
        Stage(variant="pair-s10", samples=2, keep=40, aggregator="bayes"),
        Stage(variant="pair-s30", samples=4, keep=10, aggregator="bayes"),
        Stage(variant="pair-dense", samples=10, aggregator="bayes"),
    )


@dataclass(frozen=True)
class PrunedVariant:
    name: str
    method: str
    keep: float
    reweight: bool = False
    finetune_epochs: int = 0


VARIANT_PREFIX = {"mlp": "mlp", "cnn1d": "cnn", "cnn2d": "cnn2d"}


def variant_name(arch: str, kind: str, keep: float) -> str:
    """A pruned variant's name from the network kind and what it keeps: `mlp-s25` is an MLP pruned
    structurally to 25%, `cnn-m10` a 1-D CNN with 10% of its weights left (masked)."""
    return f"{VARIANT_PREFIX.get(arch, arch)}-{kind}{round(keep * 100)}"


def default_variants(arch: str) -> tuple[PrunedVariant, ...]:
    """The embedded default's pruned variants, named after the architecture they are pruned from."""
    return (
        PrunedVariant(variant_name(arch, "s", 0.25), "greedy-asymmetric", 0.25, reweight=True, finetune_epochs=3),
        PrunedVariant(variant_name(arch, "s", 0.5), "greedy-asymmetric", 0.5, reweight=True, finetune_epochs=3),
        PrunedVariant(variant_name(arch, "m", 0.1), "magnitude", 0.1, finetune_epochs=3),
    )


def default_stages(arch: str, dense_name: str = "dense") -> tuple[Stage, ...]:
    """The default cascade over `default_variants(arch)`."""
    return (
        Stage(variant=variant_name(arch, "s", 0.25), samples=2, keep=200, aggregator="bayes"),
        Stage(variant=variant_name(arch, "s", 0.5), samples=4, keep=40, aggregator="bayes"),
        Stage(variant=dense_name, samples=10, aggregator="bayes"),
    )


@dataclass(frozen=True)
class BootstrapConfig:
    dataset: str = "mnist1d"
    num_samples: int = 52_000
    seed: int = 0
    arch: str = "cnn1d"
    epochs: int = 40
    cluster_size: int = 10
    kmeans_clusters: int = 0  # > 0: partition the pool by FAISS k-means instead of same-label clusters
    variants: tuple[PrunedVariant, ...] | None = None
    """None: `default_variants(arch)` (cnn-s25, cnn-s50, cnn-m10 for the 1-D CNN; mlp-s25, ... for an MLP)."""
    stages: tuple[Stage, ...] | None = None
    """None: `default_stages(arch)`, the default cascade over those variants."""
    dense_name: str = "dense"
    pair: PairConfig | None = field(default_factory=PairConfig)
    """None: no pair models; the space is then the held-out pool of `dataset`. Only MNIST-1D has prototypes to
    build the pair models' space from, so other datasets get none (queries by example then use the dense
    classifier's view of the examples)."""
    space_dataset: str | None = None
    """A separate `.npz` that is the space; `dataset` is then split into train/validation/test only."""

    def __post_init__(self) -> None:
        if self.variants is None:
            object.__setattr__(self, "variants", default_variants(self.arch))
        if self.stages is None:
            object.__setattr__(self, "stages", default_stages(self.arch, self.dense_name))


def space_is_built(space_dir: Path) -> bool:
    return all((space_dir / f).exists() for f in (SPACE_FILE, META_FILE, INDEX_FILE, PROBE_FILE))


def build_space_dir(
    space_dir: Path, splits: Splits, config: BootstrapConfig, encoder: torch.nn.Module | None = None
) -> None:
    """The space is the held-out pool, or with pair models the prototype views of `config.pair.space`; the probe
    set (test split) lets an operator gate new checkpoints."""
    if config.pair is not None:
        assert encoder is not None
        _build_prototype_space_dir(space_dir, splits, config, config.pair, encoder)
        return
    rng = np.random.default_rng(config.seed)
    how_built: dict[str, object]
    if splits.cluster_pool is not None:
        cluster, how, how_built = splits.cluster_pool, "given", {}
    elif config.kmeans_clusters > 0:
        cluster, how = clusters_by_kmeans(splits.x_pool, config.kmeans_clusters, config.seed), "kmeans"
        how_built = {"kmeans_clusters": config.kmeans_clusters}
    else:
        cluster, how = clusters_by_label(splits.y_pool, config.cluster_size, rng), "same-label"
        how_built = {"cluster_size": config.cluster_size}
    source = Path(splits.space_source or splits.name)
    meta = {
        "id": f"{source.stem}-s{config.seed}-n{len(splits.x_pool)}-{how}",
        "dataset": splits.name,
        "space_dataset": splits.space_source,
        "split": splits.split,
        "clusters": how,
        **how_built,
        "item_ids": "given" if splits.id_pool is not None else "rows",
        "seed": config.seed,
    }
    space = build_space(
        splits.x_pool,
        splits.y_pool,
        splits.prior,
        cluster,
        meta,
        item_ids=splits.id_pool,
        class_labels=splits.labels,
    )
    space_dir.mkdir(parents=True, exist_ok=True)
    np.savez(space_dir / PROBE_FILE, x=splits.x_test, y=splits.y_test)
    ClusterIndex.build(space).save(space_dir)
    space.save(space_dir)  # written last: its presence marks a complete space


def _build_prototype_space_dir(
    space_dir: Path, splits: Splits, config: BootstrapConfig, pair: PairConfig, encoder: torch.nn.Module
) -> None:
    """Items are views of prototypes (cluster = prototype); queries are fresh views of the same prototypes,
    never items. Stage 0 indexes the bi-encoder's embedding; the raw-feature index stays for the classifier
    path."""
    views = make_prototype_set(pair.space, "space")
    meta = {
        "id": f"mnist1d-prototypes-s{pair.space.seed}-k{pair.space.num_prototypes}-m{pair.space.views}",
        "dataset": "mnist1d-prototypes",
        "clusters": "prototypes",
        "cluster_size": pair.space.views,
        "jitter": pair.space.jitter,
        "seed": pair.space.seed,
    }
    space = build_space(views.x, views.y, splits.prior, views.cluster, meta)
    xq, cq, yq = make_queries(pair.space, pair.queries, seed=config.seed)
    space_dir.mkdir(parents=True, exist_ok=True)
    np.savez(space_dir / PROBE_FILE, x=splits.x_test, y=splits.y_test)
    QuerySet(x=xq, cluster=cq, label=yq).save(space_dir)
    gate = replace(pair.train, num_prototypes=200, seed=pair.train.seed + 1000)  # prototypes no model saw
    probes = probe_pairs(make_prototype_set(gate, "val"), seed=config.seed)
    np.savez(space_dir / PAIR_PROBE_FILE, q=probes.q.numpy(), x=probes.x.numpy(), grade=probes.grade.numpy())
    ClusterIndex.build(space).save(space_dir)
    EmbeddingIndex.build(encoder, space.features, space.offsets).save(space_dir)
    space.save(space_dir)  # written last: its presence marks a complete space


def _build_pair_models(
    registry: ModelRegistry, pair: PairConfig, steps: Progress, progress: bool, seed: int
) -> tuple[PrototypeSet, PrototypeSet]:
    train = make_prototype_set(pair.train, "train")
    val = make_prototype_set(replace(pair.train, num_prototypes=max(200, pair.train.num_prototypes // 5)), "val")
    if registry.active_version(pair.dense_name) is None:
        steps.start(f"training {pair.dense_name}")
        spec = default_pair_spec(train.x.shape[1], hidden=pair.hidden)
        model, report = train_pair_model(spec, train, val, replace(pair.training, seed=seed), progress=progress)
        probes = probe_pairs(val, seed=seed)
        registry.register(
            pair.dense_name,
            model,
            accuracy=pair_accuracy(model, probes),
            dataset="mnist1d-prototypes",
            extra={
                "grade_prior": list(report.grade_prior),
                "steps": report.steps_run,
                "best_step": report.best_step,
                "val_accuracy": report.val_accuracy,
                "train_seconds": report.seconds,
                "prototypes": asdict(pair.train),
            },
        )
    steps.done()
    for v in pair.variants:
        if registry.active_version(v.name) is None:
            steps.start(f"pruning {v.name} ({v.method}, keep {v.keep})")
            prune_pair_and_register(
                registry,
                pair.dense_name,
                v.method,
                v.keep,
                v.name,
                train,
                val,
                reweight=v.reweight,
                finetune_steps=v.finetune_steps,
                finetune=pair.training,
                seed=seed,
                progress=progress,
            )
        steps.done()
    return train, val


class Progress:
    """The bootstrap's steps: a bar on the terminal (no ETA: the steps take minutes or milliseconds, so a rate
    says nothing) and `on_progress(done, total, what)` for a server that reports it on /healthz."""

    def __init__(self, total: int, show: bool, on_progress: Callable[[int, int, str], None] | None = None) -> None:
        fmt = "{desc}: {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]"
        self.bar = tqdm(total=total, desc="bootstrap", disable=not show, bar_format=fmt)
        self.total, self.count, self.what = total, 0, ""
        self.on_progress = on_progress

    def start(self, what: str) -> None:
        self.what = what
        self.bar.set_postfix_str(what)
        if self.on_progress is not None:
            self.on_progress(self.count, self.total, what)

    def done(self) -> None:
        self.count += 1
        self.bar.update()
        if self.on_progress is not None:
            self.on_progress(self.count, self.total, self.what)

    def close(self) -> None:
        self.bar.close()


def bootstrap(
    home: Path,
    config: BootstrapConfig = BootstrapConfig(),
    progress: bool = True,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> CascadeConfig:
    """Build whatever of the embedded default is missing under `home`; returns the default cascade."""
    registry = ModelRegistry(home / "registry")
    space_dir = home / "spaces" / "default"
    config_path = home / CONFIG_FILE
    pair = config.pair if config.dataset == "mnist1d" else None  # prototypes are MNIST-1D's; other data: none yet
    if pair is None and config.pair is not None:
        config = replace(config, pair=None)
    pair_steps = 0 if pair is None else 1 + len(pair.variants)
    steps = Progress(4 + len(config.variants) + pair_steps, progress, on_progress)

    steps.start(f"data: {config.dataset}")
    splits = load_dataset(
        config.dataset,
        seed=config.seed,
        num_samples=config.num_samples,
        cache_dir=home / "data",
        space_dataset=config.space_dataset,
    )
    steps.done()

    if registry.active_version(config.dense_name) is None:
        steps.start(f"training {config.dense_name}")
        spec = default_spec(splits, config.arch)  # type: ignore[arg-type]
        train_config = TrainConfig(epochs=config.epochs, seed=config.seed, progress=progress)
        data_args: dict[str, object] = {"seed": config.seed, "num_samples": config.num_samples}
        if config.space_dataset is not None:  # later commands (prune) must cut the training file alike
            data_args["space_dataset"] = config.space_dataset
        train_and_register(registry, config.dense_name, spec, splits, train_config, data_args)
    steps.done()

    for v in config.variants:
        if registry.active_version(v.name) is None:
            steps.start(f"pruning {v.name} ({v.method}, keep {v.keep})")
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
        steps.done()

    encoder = None
    if pair is not None:
        train, val = _build_pair_models(registry, pair, steps, progress, config.seed)
        if not space_is_built(space_dir):
            steps.start("training the bi-encoder (stage 0)")
            encoder = train_biencoder(train, val, replace(pair.biencoder, seed=config.seed, progress=progress))

    if not space_is_built(space_dir):
        steps.start("building space and FAISS indexes")
        build_space_dir(space_dir, splits, config, encoder)
    steps.done()

    if not config_path.exists():
        CascadeConfig(
            stages=config.stages,
            dense=config.dense_name,
            pair_stages=None if pair is None else pair.stages,
            pair_dense=None if pair is None else pair.dense_name,
        ).save(config_path)
        (home / "bootstrap.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    steps.done()
    steps.close()
    return CascadeConfig.load(config_path)
