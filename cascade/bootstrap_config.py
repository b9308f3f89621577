"""What the embedded default builds, as settings: the classifier's pruned variants and default cascade, and the
query-by-example path's space, bi-encoder, pair models and their training budgets (`PairConfig`). The bootstrap
(`cascade.bootstrap`) builds from these; its time estimate and its record read them without importing it."""

from __future__ import annotations

from dataclasses import dataclass, field

from cascade.config import Stage
from models.biencoder_training import BiEncoderTrainConfig
from models.pair_training import ListwiseConfig, PairTrainConfig
from models.prototypes import PrototypeConfig

__all__ = [
    "BootstrapConfig",
    "PairConfig",
    "PrunedVariant",
    "PrunedPairVariant",
    "VARIANT_PREFIX",
    "variant_name",
    "default_variants",
    "default_stages",
]


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
    biencoder: BiEncoderTrainConfig = BiEncoderTrainConfig(steps=3000)
    """Stage 0's training. FAISS alone is the answer whenever no reranker beats it, so its steps are the cheapest
    quality the first run buys: on the default space's 250 dev / 250 test queries, recall@1 0.576 / 0.556 after
    1,000 steps, 0.636 / 0.644 after 3,000; docs/results.md has the sweep and its seconds."""
    training: PairTrainConfig = PairTrainConfig(steps=400)
    """Pointwise pretraining of the dense pair model's scorer on pairs (`train_pair_model`: what one member says
    about its cluster, learnt from many pairs per step), before the listwise training; 0 steps: none.
    The step counts here and below are the first run's budget: with 800 pointwise, 300 listwise and 200
    distillation steps the listwise phase's best validation step was 50, and the dense rerank on 100 dev queries
    was recall@1 0.54 / nDCG@10 0.885 against 0.54 / 0.881 with these (FAISS alone 0.53 / 0.880); docs/results.md
    has both bootstraps' times."""
    listwise: ListwiseConfig = ListwiseConfig(steps=100)
    """How the dense pair model is trained: on the stage-0 bi-encoder's own candidate lists, starting from its
    ranking (`PairSpec.retriever`, `train_pair_listwise`); the pruned variants are distilled from it the same way
    (`distill`), their scorer only."""
    distill: str = "margin"
    hidden: tuple[int, ...] = (256, 256)
    dense_name: str = "pair-dense"
    variants: tuple[PrunedPairVariant, ...] = (
        PrunedPairVariant("pair-s10", "greedy-asymmetric", 0.1, finetune_steps=100),
        PrunedPairVariant("pair-s30", "greedy-asymmetric", 0.3, finetune_steps=100),
    )
    stages: tuple[Stage, ...] = (  # as trained: members' logits averaged (`mean_logit`); the last stage extends
        Stage(variant="pair-s10", samples=1, keep=60, aggregator="mean_logit"),  # the one before (7 more members
        Stage(variant="pair-dense", samples=3, keep=20, aggregator="mean_logit"),  # each); docs/performance.md
        Stage(variant="pair-dense", samples=10, aggregator="mean_logit"),  # section 0 measures it
    )
    instance_auc_threshold: float = 0.7
    """A user's clusters carry instance structure when the dense pair model ranks own-cluster pairs above
    same-label pairs of validation clusters with an AUC of at least this (0.5 = chance); else the space falls
    back to two grades. 0.7 sits far from both chance and what clusters of near duplicates reach (measured in
    tests/test_byod_pair.py: 0.50 on random same-label groups, 0.94 on MNIST-1D prototype views), while the
    AUC's standard error on the 2,000 measured pairs is about 0.013 at chance, so noise does not flip it."""


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
    """None: no pair models; the space is then the held-out pool of `dataset`. MNIST-1D builds the pair models'
    space from prototypes; a user's `.npz` uses its own clusters (see `user_pair`); digits has no clusters and
    gets none (queries by example then use the dense classifier's view of the examples)."""
    user_pair: bool | None = None
    """A user's `.npz`: train pair models on its clusters (True; the data must have a `cluster` column), not
    (False), or None: exactly when it has a cluster column. Only `pair`'s training settings, variants and
    stages apply; its prototype settings are MNIST-1D's."""
    space_dataset: str | None = None
    """A separate `.npz` that is the space; `dataset` is then split into train/validation/test only."""
    tune: bool = True
    """End by tuning the default pair cascade on the space's dev queries (`cascade.tuner.tune_home`)."""

    def __post_init__(self) -> None:
        if self.variants is None:
            object.__setattr__(self, "variants", default_variants(self.arch))
        if self.stages is None:
            object.__setattr__(self, "stages", default_stages(self.arch, self.dense_name))
