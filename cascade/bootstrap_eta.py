"""How long a bootstrap will take, said before it starts: the long steps are probed for a few of their own
iterations on this machine, as loaded as it is now, and the probes are scaled to the steps' full lengths.

A probe runs the step's real training function on the run's own data with a shortened config: one and three
epochs of the dense classifier, `PROBE_STEPS` and twice as many steps of the dense pair model's pointwise phase
and of the bi-encoder, 8 and 16 steps of its listwise phase (the difference is the cost of an epoch or a step; the
rest, set-up and one evaluation, is charged once per evaluation of the full run). Steps with no probe of their
own (pruning, distillation, tuning) are charged in those units as measured (`UNITS`). The probes cost about 40 s
on two cores loaded by five jobs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cascade.bootstrap_config import BootstrapConfig, PairConfig
    from models.data import Splits
    from models.prototypes import PrototypeSet

__all__ = ["Estimate", "estimate_bootstrap", "PROBE_STEPS", "format_seconds"]

PROBE_STEPS = 15
UNITS = {
    "classifier epochs per pruned variant": 0.6,
    "pair steps per pruned pair variant": 30.0,
    "listwise steps per distillation step": 1.2,
    "tuning seconds per second of its refinement bound": 1.25,
    "pair evaluations for the grades decision and registration": 2.0,
    "classifier epochs per 9,000 space items": 1.2,
    "patience multiples the dense classifier trains for": 3.0,
}
"""Measured on digits in clusters of 5 views (8,985 items, `benchmarks/byod_digits.py --views 5`): each pruned
classifier took about 0.6 of the dense classifier's epoch, each pruned pair variant about 30 training steps of
the dense pair model besides its fine-tuning, the grades decision and registration about two evaluations, the
space and its indexes about 1.2 epochs; early stopping ended the dense classifier well before its 40 epochs.
Measured on the embedded default (`prunecascade bootstrap`, 2026-12-02, a loaded machine): a pruned pair variant's
distillation step cost 1.2 listwise steps of the dense pair model (61 s for 200 against 78 s for 300), and the
tuning step took 55 s under its 45 s refinement bound (references and the coarse grid always run)."""


@dataclass
class Estimate:
    """Seconds per step, what the probes themselves took, and how each was reckoned."""

    steps: dict[str, float] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)
    probe_seconds: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.steps.values())

    def add(self, step: str, seconds: float, how: str) -> None:
        self.steps[step] = self.steps.get(step, 0.0) + seconds
        self.how[step] = how

    def line(self) -> str:
        parts = ", ".join(f"{k} {format_seconds(v)}" for k, v in self.steps.items() if v >= 1)
        return f"bootstrap: about {format_seconds(self.total)} on this machine as loaded now ({parts})"

    def record(self) -> dict[str, Any]:
        return {
            "seconds": round(self.total, 1),
            "steps": {k: round(v, 1) for k, v in self.steps.items()},
            "probe_seconds": round(self.probe_seconds, 1),
            "how": dict(self.how),
        }


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _two_probes(
    run: Callable[[int], object],
    steps: int,
    evals: float,
    evals_after: float = 0.0,
    probe_steps: int = PROBE_STEPS,
) -> tuple[float, float, str, float]:
    """Seconds for `steps` steps and `evals + evals_after` evaluations, from runs of `probe_steps` and twice as
    many steps (each with one evaluation at its end). Returns (estimate, probe time, how, seconds per step)."""
    short = _timed(lambda: run(probe_steps))
    long = _timed(lambda: run(2 * probe_steps))
    per_step = max((long - short) / probe_steps, short / (2 * probe_steps) * 0.5, 1e-6)
    once = max(short - probe_steps * per_step, 0.0)  # set-up and one evaluation
    how = f"{per_step * 1000:.1f} ms per step x {steps}, {once:.2f} s per evaluation x {evals + evals_after:g}"
    return steps * per_step + (evals + evals_after) * once, short + long, how, per_step


def _epoch(splits: Splits, arch: str) -> tuple[float, float]:
    """Seconds of one training epoch of the dense classifier (and the probe's own time)."""
    from models.dense import default_spec
    from models.networks import build_network
    from models.training import TrainConfig, train_classifier

    def run(epochs: int) -> float:
        model = build_network(default_spec(splits, arch))  # type: ignore[arg-type]
        config = TrainConfig(epochs=epochs, patience=epochs, progress=False)
        return _timed(
            lambda: train_classifier(model, splits.x_train, splits.y_train, splits.x_val, splits.y_val, config)
        )

    one, three = run(1), run(3)  # the difference: the first call's warm-up is no epoch's cost
    return max((three - one) / 2, one / 3), one + three


def _pair_sets(config: BootstrapConfig, splits: Splits, user: bool) -> tuple[PrototypeSet, PrototypeSet]:
    """The sets the pair models will train on (a user's clusters), or a small sample of MNIST-1D prototypes:
    a step costs the same on any number of prototypes."""
    from models.prototypes import make_prototype_set, member_set

    if user:
        assert splits.cluster_train is not None and splits.cluster_val is not None
        return (
            member_set(splits.x_train, splits.y_train, splits.cluster_train),
            member_set(splits.x_val, splits.y_val, splits.cluster_val),
        )
    assert config.pair is not None
    small = replace(config.pair.train, num_prototypes=min(300, config.pair.train.num_prototypes))
    return make_prototype_set(small, "train"), make_prototype_set(replace(small, num_prototypes=200), "val")


def estimate_bootstrap(
    config: BootstrapConfig,
    splits: Splits,
    pair: PairConfig | None,
    user_pair: bool,
    missing: Callable[[str], bool],
    space_missing: bool,
) -> Estimate:
    """Seconds each missing step of `bootstrap` will take. `pair`: the pair config the run trains (None: no
    pair models); `missing(name)`: whether a model still has to be built."""
    from models.biencoder import spec_for
    from models.biencoder_training import train_biencoder
    from models.pair import PairNetwork
    from models.pair_training import pair_spec_for, train_pair_listwise, train_pair_model

    est = Estimate()
    epoch, probe = _epoch(splits, config.arch)
    est.probe_seconds += probe
    if missing(config.dense_name):
        from models.training import TrainConfig

        epochs = min(config.epochs, UNITS["patience multiples the dense classifier trains for"] * TrainConfig.patience)
        est.add("dense classifier", epochs * epoch, f"{epoch:.2f} s per epoch x {epochs:g} (early stopping)")
    for v in config.variants or ():
        if missing(v.name):
            epochs = UNITS["classifier epochs per pruned variant"] + v.finetune_epochs
            est.add("pruned classifiers", epochs * epoch, "in epochs of the dense classifier")
    if pair is not None:
        train, val = _pair_sets(config, splits, user_pair)
        training = replace(pair.training, progress=False)
        listwise = replace(pair.listwise, progress=False)
        # the model as the bootstrap builds it: the scorer over a frozen copy of the bi-encoder (its weights do
        # not change what a step costs)
        spec = replace(pair_spec_for(train.x.shape[1], 3, pair.hidden), retriever=spec_for(train.x.shape[1]))

        def pair_run(steps: int) -> object:
            probe_config = replace(training, steps=steps, eval_every=steps)
            return train_pair_model(spec, train, val, probe_config, progress=False, model=PairNetwork(spec))

        # fewer validation lists than the run's: the probe's set-up (drawing them) is most of an evaluation's cost
        probe_val = min(64, listwise.val_queries)

        def listwise_run(steps: int) -> object:
            probe_config = replace(listwise, steps=steps, eval_every=steps, val_queries=probe_val)
            return train_pair_listwise(PairNetwork(spec), train, val, probe_config, progress=False)

        per_step = per_list_step = 0.0
        if missing(pair.dense_name) or any(missing(v.name) for v in pair.variants):
            seconds, how = 0.0, []
            if training.steps > 0:
                evals = math.ceil(training.steps / training.eval_every)
                evals_after = UNITS["pair evaluations for the grades decision and registration"]
                point, probe, said, per_step = _two_probes(pair_run, training.steps, evals, evals_after)
                est.probe_seconds += probe
                seconds, how = seconds + point, [*how, f"pointwise: {said}"]
            if listwise.steps > 0:
                evals = math.ceil(listwise.steps / listwise.eval_every)
                lists, probe, said, per_list_step = _two_probes(listwise_run, listwise.steps, evals, 0, 8)
                est.probe_seconds += probe
                seconds, how = seconds + lists, [*how, f"listwise: {said}"]
            if missing(pair.dense_name):
                est.add(f"dense pair model ({pair.dense_name})", seconds, "; ".join(how))
        for v in pair.variants:
            if missing(v.name):
                seconds = UNITS["pair steps per pruned pair variant"] * per_step
                if per_list_step > 0:  # distilled from the dense model on the retriever's lists
                    seconds += v.finetune_steps * UNITS["listwise steps per distillation step"] * per_list_step
                else:
                    seconds += v.finetune_steps * per_step
                est.add("pruned pair models", seconds, "in steps of the dense pair model's training")
        if space_missing:
            bi = replace(pair.biencoder, progress=False)
            evals = math.ceil(bi.steps / bi.eval_every)

            def bi_run(steps: int) -> object:
                return train_biencoder(train, val, replace(bi, steps=steps, eval_every=steps))

            seconds, probe, how, _ = _two_probes(bi_run, bi.steps, evals)
            est.probe_seconds += probe
            est.add("bi-encoder", seconds, how)
    if space_missing:
        epochs = UNITS["classifier epochs per 9,000 space items"] * max(1.0, len(splits.served.x) / 9000)
        est.add("space and indexes", epochs * epoch, "in epochs of the dense classifier")
    if pair is not None and config.tune:
        from cascade.tuner import BOOTSTRAP_TUNE

        bound = BOOTSTRAP_TUNE.max_seconds
        seconds = UNITS["tuning seconds per second of its refinement bound"] * bound
        est.add("tuning on dev queries", seconds, f"its refinement stops after {bound:g} s")
    return est
