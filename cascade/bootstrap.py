"""The embedded default: MNIST-1D generated locally, a dense CNN, pruned variants, a space of held-out items
with its index, and the default cascade. Every step is skipped when its artefact already exists, so a second
run is ready in seconds.

A user's `.npz` with a `cluster` column gets the query-by-example path too (issue 14, item 2): pair models and
the bi-encoder trained on the training split's clusters, a space whose held-out queries are members removed
from their clusters, and a measured decision whether the clusters carry instance structure (three grades) or
not (two: same label, other)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cascade.bootstrap_config import BootstrapConfig, PairConfig
from cascade.bootstrap_eta import Estimate, estimate_bootstrap
from cascade.bootstrap_record import describe_run, nothing_left_on_failure, read_record, write_record
from cascade.config import CONFIG_FILE, CascadeConfig
from cascade.embedding import EmbeddingIndex
from cascade.index import INDEX_FILE, ClusterIndex
from cascade.queries import QuerySet, default_gains, hold_out_members
from cascade.space import (
    META_FILE,
    PAIR_PROBE_FILE,
    PROBE_FILE,
    SPACE_FILE,
    build_space,
    clusters_by_kmeans,
    clusters_by_label,
)
from cascade.tuner import tune_home
from models.biencoder import BiEncoder
from models.biencoder_training import train_biencoder
from models.data import PARTS, DatasetError, Splits, load_dataset
from models.dense import default_spec, train_and_register
from models.pair import PairNetwork, PairSpec, default_pair_spec
from models.pair_calibration import calibrate_pair
from models.pair_training import (
    PairTrainConfig,
    PairTrainReport,
    instance_auc,
    pair_accuracy,
    pair_spec_for,
    train_pair_listwise,
    train_pair_model,
)
from models.prototypes import PrototypeSet, make_prototype_set, make_queries, member_set
from models.pruning.pair import probe_pairs, prune_pair_and_register
from models.pruning.pipeline import prune_and_register
from models.registry import ModelRegistry
from models.training import TrainConfig

__all__ = [
    "bootstrap",
    "space_is_built",
    "build_space_dir",
    "wants_user_pair",
    "train_pair_on_clusters",
]


def wants_user_pair(config: BootstrapConfig, splits: Splits) -> bool:
    """Whether a user's data gets pair models: `user_pair`, where None means "when it has clusters"."""
    if config.dataset in ("mnist1d", "digits") or config.pair is None or config.user_pair is False:
        return False
    if splits.cluster_train is None:
        if config.user_pair:
            raise DatasetError(f"{splits.name}: pair models need a cluster column (or bootstrap with --no-pair)")
        return False
    return True


def space_is_built(space_dir: Path) -> bool:
    return all((space_dir / f).exists() for f in (SPACE_FILE, META_FILE, INDEX_FILE, PROBE_FILE))


def build_space_dir(
    space_dir: Path,
    splits: Splits,
    config: BootstrapConfig,
    encoder: torch.nn.Module | None = None,
    grades: dict[str, object] | None = None,
) -> None:
    """The space is the held-out pool (less the held-out queries when a user's data has pair models, `grades`
    then recording the decision on instance structure), or for MNIST-1D with pair models the prototype views of
    `config.pair.space`; the probe set (test split) lets an operator gate new checkpoints."""
    if config.pair is not None and config.dataset == "mnist1d":
        assert encoder is not None
        _build_prototype_space_dir(space_dir, splits, config, config.pair, encoder)
        return
    if grades is not None:
        assert encoder is not None and config.pair is not None
        _build_user_pair_space_dir(space_dir, splits, config, config.pair, encoder, grades)
        return
    rng = np.random.default_rng(config.seed)
    items = splits.served  # a user's whole file when it has clusters, else the pool
    how_built: dict[str, object]
    if items.cluster is not None:
        cluster, how, how_built = items.cluster, "given", {}
    elif config.kmeans_clusters > 0:
        cluster, how = clusters_by_kmeans(items.x, config.kmeans_clusters, config.seed), "kmeans"
        how_built = {"kmeans_clusters": config.kmeans_clusters}
    else:
        cluster, how = clusters_by_label(items.y, config.cluster_size, rng), "same-label"
        how_built = {"cluster_size": config.cluster_size}
    source = Path(splits.space_source or splits.name)
    meta = {
        "id": f"{source.stem}-s{config.seed}-n{len(items.x)}-{how}",
        "dataset": splits.name,
        "space_dataset": splits.space_source,
        "split": splits.split,
        "served": _served_what(splits),
        "clusters": how,
        **how_built,
        "item_ids": "given" if items.ids is not None else "rows",
        "seed": config.seed,
    }
    space = build_space(
        items.x,
        items.y,
        splits.prior,
        cluster,
        meta,
        item_ids=items.ids,
        class_labels=splits.labels,
        item_parts=items.part,
    )
    space_dir.mkdir(parents=True, exist_ok=True)
    np.savez(space_dir / PROBE_FILE, x=splits.x_test, y=splits.y_test)
    ClusterIndex.build(space).save(space_dir)
    space.save(space_dir)  # written last: its presence marks a complete space


def _served_what(splits: Splits) -> str:
    """The space meta's `served`: what of the data the space holds."""
    if splits.space_source is not None:
        return "every item of the space file (the training file is only trained on)"
    if splits.corpus is not None:
        return "every cluster of the dataset (seen_by_models: which ones the models saw)"
    return "the pool split: items no model was trained on"


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


def _build_user_pair_space_dir(
    space_dir: Path,
    splits: Splits,
    config: BootstrapConfig,
    pair: PairConfig,
    encoder: torch.nn.Module,
    grades: dict[str, object],
) -> None:
    """A user's whole file (or its space file) with `pair.queries` members held out (one each of that many
    clusters of two or more members that no model saw; the clusters stay), the pair probe drawn from the test
    split's clusters, and both indexes: raw features for the classifier path, the bi-encoder's embedding for
    stage 0."""
    items = splits.served
    assert items.cluster is not None
    cluster = items.cluster
    unseen = np.arange(len(cluster)) if items.part is None else np.flatnonzero(items.part == PARTS.index("pool"))
    held = unseen[hold_out_members(cluster[unseen], pair.queries, np.random.default_rng([config.seed, 51]))]
    keep = np.ones(len(cluster), dtype=bool)
    keep[held] = False
    num_grades = int(grades["num_grades"])  # type: ignore[call-overload]
    source = Path(splits.space_source or splits.name)
    meta = {
        "id": f"{source.stem}-s{config.seed}-n{int(keep.sum())}-given-g{num_grades}",
        "dataset": splits.name,
        "space_dataset": splits.space_source,
        "split": splits.split,
        "served": _served_what(splits),
        "clusters": "given",
        "item_ids": "given" if items.ids is not None else "rows",
        "seed": config.seed,
        "queries": f"{len(held)} members held out of as many clusters no model saw (the clusters stay in the space)",
        "grades": grades,
    }
    space = build_space(
        items.x[keep],
        items.y[keep],
        splits.prior,
        cluster[keep],
        meta,
        item_ids=None if items.ids is None else items.ids[keep],
        class_labels=splits.labels,
        item_parts=None if items.part is None else items.part[keep],
    )
    space_dir.mkdir(parents=True, exist_ok=True)
    np.savez(space_dir / PROBE_FILE, x=splits.x_test, y=splits.y_test)
    rows = np.searchsorted(space.cluster_ids, cluster[held])
    QuerySet(x=items.x[held], cluster=rows.astype(np.int64), label=items.y[held]).save(space_dir)
    assert splits.cluster_test is not None
    try:
        probe_set = replace(member_set(splits.x_test, splits.y_test, splits.cluster_test), num_grades=num_grades)
    except ValueError:
        probe_set = None  # no test cluster has two members: no pair probe, uploads are not gated on one
    if probe_set is not None:
        probes = probe_pairs(probe_set, seed=config.seed)
        np.savez(space_dir / PAIR_PROBE_FILE, q=probes.q.numpy(), x=probes.x.numpy(), grade=probes.grade.numpy())
    ClusterIndex.build(space).save(space_dir)
    EmbeddingIndex.build(encoder, space.features, space.offsets).save(space_dir)
    space.save(space_dir)  # written last: its presence marks a complete space


def user_pair_sets(splits: Splits) -> tuple[PrototypeSet, PrototypeSet]:
    """The training and validation splits' clusters as pair-sampling sets (clusters of two or more members)."""
    assert splits.cluster_train is not None and splits.cluster_val is not None
    sets = []
    for what, x, y, c in (
        ("training", splits.x_train, splits.y_train, splits.cluster_train),
        ("validation", splits.x_val, splits.y_val, splits.cluster_val),
    ):
        try:
            sets.append(member_set(x, y, c))
        except ValueError:
            raise DatasetError(
                f"{splits.name}: no cluster of the {what} split has two or more members, so pair models have no "
                "same-cluster pairs to learn from; give larger clusters or bootstrap with --no-pair"
            ) from None
    return sets[0], sets[1]


def _decide_grades(auc: float, threshold: float, pairs: int) -> dict[str, object]:
    """The record of the instance-structure decision (space meta, bootstrap.json, the dense manifest)."""
    structured = auc == auc and auc >= threshold  # NaN (nothing to compare) is no evidence of structure
    if auc != auc:
        why = "no label has two validation clusters, so own-cluster and same-label pairs could not be compared"
    elif structured:
        why = f"the dense pair model tells a query's own cluster from others of its label (AUC {auc:.3f})"
    else:
        why = f"the clusters carry no instance structure the pair model can see (AUC {auc:.3f}, chance 0.5)"
    return {
        "num_grades": 3 if structured else 2,
        "gains": list(default_gains(3 if structured else 2)),
        "instance_auc": None if auc != auc else round(auc, 4),
        "threshold": threshold,
        "measured_on": f"{pairs} validation pairs, own cluster vs same label, AUC of log p(grade 2)",
        "decision": (
            "three grades: 2 own cluster, 1 same label, 0 other; "
            if structured
            else "two grades: 1 same label, 0 other; "
        )
        + why,
    }


def new_pair_model(spec: PairSpec, encoder: BiEncoder) -> PairNetwork:
    """An untrained pair model over `spec` whose retriever is a copy of the stage-0 bi-encoder `encoder`: it
    starts from FAISS's ranking (`PairSpec.retriever`)."""
    model = PairNetwork(replace(spec, retriever=encoder.spec))
    assert model.retriever is not None
    model.retriever.load_state_dict(encoder.state_dict())
    return model


def train_pair_on_clusters(
    train: PrototypeSet,
    val: PrototypeSet,
    pair: PairConfig,
    encoder: BiEncoder,
    seed: int = 0,
    progress: bool = False,
) -> tuple[PairNetwork, PairTrainReport, dict[str, object]]:
    """The dense pair model of a user's clusters and the decision on instance structure: train over three
    grades on the retriever's candidate lists (`train_pair_listwise`, as for the default space), measure on `val`
    (clusters it never saw) whether log p(grade 2) ranks own-cluster pairs above same-label pairs
    (`instance_auc`); below `pair.instance_auc_threshold`, the clusters say nothing beyond their label, and the
    model is trained again over two grades (1 same label, 0 other). Returns the model, its training report and
    the decision record (num_grades, gains, the measured AUC, the threshold, why)."""
    input_dim = train.x.shape[1]
    model, report = train_dense_pair(
        pair_spec_for(input_dim, 3, pair.hidden), encoder, train, val, pair, seed, progress
    )
    auc_pairs = 2000
    grades = _decide_grades(instance_auc(model, val, seed, auc_pairs), pair.instance_auc_threshold, auc_pairs)
    if grades["num_grades"] == 2:
        two = (replace(train, num_grades=2), replace(val, num_grades=2))
        spec = pair_spec_for(input_dim, 2, pair.hidden)
        model, report = train_dense_pair(
            spec, encoder, *two, replace(pair, training=_two_grades(pair.training)), seed, progress
        )
    return model, report, grades


def _two_grades(training: PairTrainConfig) -> PairTrainConfig:
    """The pointwise pretraining over two grades: same-cluster pairs count as same label."""
    mix = training.grade_mix
    return replace(training, grade_mix=(mix[0], sum(mix[1:])), listwise=0.0)


def train_dense_pair(
    spec: PairSpec,
    encoder: BiEncoder,
    train: PrototypeSet,
    val: PrototypeSet,
    pair: PairConfig,
    seed: int = 0,
    progress: bool = False,
) -> tuple[PairNetwork, PairTrainReport]:
    """The dense pair model: a copy of the stage-0 bi-encoder as its retriever (`new_pair_model`), the scorer
    pretrained pointwise on pairs (`pair.training`, when it has steps), then trained listwise on the retriever's
    candidate lists (`pair.listwise`), keeping the best of those and of the retriever alone on validation."""
    model = new_pair_model(spec, encoder)
    if pair.training.steps > 0:
        model, _ = train_pair_model(model.spec, train, val, replace(pair.training, seed=seed), progress, model=model)
    return train_pair_listwise(model, train, val, replace(pair.listwise, seed=seed), progress)


def _build_user_pair_models(
    registry: ModelRegistry,
    pair: PairConfig,
    splits: Splits,
    train: PrototypeSet,
    val: PrototypeSet,
    encoder: Callable[[], BiEncoder],
    steps: Progress,
    progress: bool,
    seed: int,
) -> dict[str, object]:
    """Dense pair model (three grades, or retrained on two when the measured AUC falls below the threshold) and
    its pruned variants, all on the training split's clusters. Returns the grades decision."""
    if registry.active_version(pair.dense_name) is None:
        steps.start(f"training {pair.dense_name}")
        model, report, grades = train_pair_on_clusters(train, val, pair, encoder(), seed, progress)
        if grades["num_grades"] == 2:
            train, val = replace(train, num_grades=2), replace(val, num_grades=2)
        registry.register(
            pair.dense_name,
            model,
            accuracy=pair_accuracy(model, probe_pairs(val, seed=seed)),
            dataset=splits.name,
            extra={
                "posterior_calibration": calibrate_pair(model, val, seed=seed),
                "grade_prior": list(report.grade_prior),
                "steps": report.steps_run,
                "best_step": report.best_step,
                "val_accuracy": report.val_accuracy,
                "train_seconds": report.seconds,
                "gains": grades["gains"],
                "grades": grades,
                "training": "listwise on the retriever's candidate lists",
            },
        )
    else:
        manifest = registry.manifest(pair.dense_name)
        grades = dict(manifest.extra.get("grades") or {})
        grades.setdefault("num_grades", int(manifest.spec.get("num_grades", 3)))
        grades.setdefault("decision", "the grades of the registered dense pair model (no measurement recorded)")
        if grades["num_grades"] == 2:
            train, val = replace(train, num_grades=2), replace(val, num_grades=2)
    steps.done()
    _prune_pair_variants(registry, pair, train, val, steps, progress, seed)
    return grades


def prototype_training_sets(pair: PairConfig) -> tuple[PrototypeSet, PrototypeSet]:
    """The training and validation prototypes of the pair models and the bi-encoder (never the space's)."""
    train = make_prototype_set(pair.train, "train")
    val = make_prototype_set(replace(pair.train, num_prototypes=max(200, pair.train.num_prototypes // 5)), "val")
    return train, val


def _build_pair_models(
    registry: ModelRegistry,
    pair: PairConfig,
    train: PrototypeSet,
    val: PrototypeSet,
    encoder: Callable[[], BiEncoder],
    steps: Progress,
    progress: bool,
    seed: int,
) -> None:
    if registry.active_version(pair.dense_name) is None:
        steps.start(f"training {pair.dense_name}")
        spec = default_pair_spec(train.x.shape[1], hidden=pair.hidden)
        model, report = train_dense_pair(spec, encoder(), train, val, pair, seed, progress)
        probes = probe_pairs(val, seed=seed)
        registry.register(
            pair.dense_name,
            model,
            accuracy=pair_accuracy(model, probes),
            dataset="mnist1d-prototypes",
            extra={
                "posterior_calibration": calibrate_pair(model, val, seed=seed),
                "grade_prior": list(report.grade_prior),
                "steps": report.steps_run,
                "best_step": report.best_step,
                "val_accuracy": report.val_accuracy,
                "train_seconds": report.seconds,
                "prototypes": asdict(pair.train),
                "training": "listwise on the retriever's candidate lists",
            },
        )
    steps.done()
    _prune_pair_variants(registry, pair, train, val, steps, progress, seed)


def _prune_pair_variants(
    registry: ModelRegistry,
    pair: PairConfig,
    train: PrototypeSet,
    val: PrototypeSet,
    steps: Progress,
    progress: bool,
    seed: int,
) -> None:
    """The pruned pair variants of `pair`, each a step; those already registered are skipped."""
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
                listwise=pair.listwise,
                distill=pair.distill,
                seed=seed,
                progress=progress,
            )
        steps.done()


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

    def add(self, steps: int) -> None:
        """More steps than first counted (known once the data is loaded)."""
        self.total += steps
        self.bar.total = self.total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def bootstrap(
    home: Path,
    config: BootstrapConfig = BootstrapConfig(),
    progress: bool = True,
    on_progress: Callable[[int, int, str], None] | None = None,
    on_estimate: Callable[[Estimate], None] | None = None,
    on_servable: Callable[[], None] | None = None,
) -> CascadeConfig:
    """Build whatever of the embedded default is missing under `home`; returns the default cascade. The data is
    checked before anything is written, and a run into a fresh home that fails leaves nothing behind. With
    `on_estimate`, the missing steps are probed first and it is told how long they will take.

    `on_servable` is called once the home can already answer (classifiers, bi-encoder, space and FAISS index
    built, a `cascade.json` without pair stages written) while the prototype space's pair models and their tuning
    are still to come: a server loads it then and answers from FAISS alone and the exact table meanwhile, which is
    what it may serve before a reranker is checked on dev queries anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small networks train 5x cheaper and 10x faster on one thread than on two
    try:  # loaded cores (docs/results.md, "Bring your own data: bootstrap time")
        with nothing_left_on_failure(home):
            return _bootstrap(home, config, progress, on_progress, on_estimate, on_servable)
    finally:
        torch.set_num_threads(threads)


def _bootstrap(
    home: Path,
    config: BootstrapConfig,
    progress: bool,
    on_progress: Callable[[int, int, str], None] | None,
    on_estimate: Callable[[Estimate], None] | None = None,
    on_servable: Callable[[], None] | None = None,
) -> CascadeConfig:
    started = time.perf_counter()
    space_dir = home / "spaces" / "default"
    config_path = home / CONFIG_FILE
    pair = config.pair if config.dataset == "mnist1d" else None  # prototypes are MNIST-1D's; user data: below
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
    user_pair = config.pair if wants_user_pair(config, splits) else None
    if pair is None and user_pair is None and config.pair is not None:
        config = replace(config, pair=None)
    if user_pair is not None:
        user_pair_sets(splits)  # refuses clusters too small for pair training before anything is written
        steps.add(1 + len(user_pair.variants))
    home.mkdir(parents=True, exist_ok=True)
    record = read_record(home)
    if record is None:  # from now on this home is this data's, even if the run is interrupted
        write_record(home, describe_run(config, splits, None), "building")
    registry = ModelRegistry(home / "registry")
    estimate = None
    if on_estimate is not None and read_record(home).get("state") != "complete":  # type: ignore[union-attr]
        estimate = estimate_bootstrap(
            config,
            splits,
            pair or user_pair,
            user_pair is not None,
            lambda name: registry.active_version(name) is None,
            not space_is_built(space_dir),
        )
        on_estimate(estimate)
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

    encoder: BiEncoder | None = None
    grades = None
    any_pair = pair or user_pair
    if any_pair is not None:
        train, val = prototype_training_sets(any_pair) if pair is not None else user_pair_sets(splits)

        def stage0() -> BiEncoder:
            """The stage-0 bi-encoder, trained first: the pair models start from its ranking and learn on its
            candidate lists. A built space keeps its own (the pair models must agree with its index)."""
            nonlocal encoder
            if encoder is None:
                stored = EmbeddingIndex.load(space_dir) if space_is_built(space_dir) else None
                if stored is not None:
                    encoder = stored.encoder  # type: ignore[assignment]
                else:
                    steps.start("training the bi-encoder (stage 0)")
                    bi_config = replace(any_pair.biencoder, seed=config.seed, progress=progress)
                    encoder = train_biencoder(train, val, bi_config)
            assert encoder is not None
            return encoder

        if user_pair is not None:  # a user's space records the grades its pair models chose
            grades = _build_user_pair_models(
                registry, user_pair, splits, train, val, stage0, steps, progress, config.seed
            )
        if not space_is_built(space_dir):
            stage0()

    if not space_is_built(space_dir):
        steps.start("building space and FAISS indexes")
        build_space_dir(space_dir, splits, config, encoder, grades)
    steps.done()

    full = CascadeConfig(
        stages=config.stages,
        dense=config.dense_name,
        pair_stages=None if any_pair is None else any_pair.stages,
        pair_dense=None if any_pair is None else any_pair.dense_name,
    )
    finished_before = (read_record(home) or {}).get("state") == "complete"
    if pair is not None:
        if on_servable is not None and registry.active_version(pair.dense_name) is None:
            if not config_path.exists():
                full.model_copy(update={"pair_stages": None, "pair_dense": None}).save(config_path)
            on_servable()  # answers from FAISS alone while the pair models train
        _build_pair_models(registry, pair, train, val, stage0, steps, progress, config.seed)

    stored = CascadeConfig.load(config_path) if config_path.exists() else None
    if stored is None:
        full.save(config_path)
    elif any_pair is not None and stored.pair_dense is None and not finished_before:  # written by `on_servable`
        stored.model_copy(update={"pair_stages": full.pair_stages, "pair_dense": full.pair_dense}).save(config_path)
    built = read_record(home)
    if built is None or built.get("state", "complete") != "complete":  # homes built before states were complete
        timing = {} if estimate is None else {"estimate": estimate.record()}
        timing["seconds"] = round(time.perf_counter() - started, 1)  # of this run (a resumed one: its part)
        write_record(home, {**describe_run(config, splits, grades), **timing}, "complete")
    steps.done()
    steps.close()
    if any_pair is not None and config.tune:  # the default pair cascade measured on dev queries, not guessed
        tune_home(home)
    return CascadeConfig.load(config_path)
