"""Pair models (cross-encoders), the bi-encoder, pair training, pair pruning with every method, registry."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from models.biencoder import BiEncoder, BiEncoderSpec, cluster_centroids, load_biencoder, save_biencoder
from models.biencoder_training import BiEncoderTrainConfig, train_biencoder
from models.manifest import Manifest
from models.pair import (
    FoldedQuery,
    PairNetwork,
    PairSpec,
    correlate,
    default_pair_spec,
    folded_pair_cost,
    pair_cost,
    pair_flops,
    pair_query_flops,
)
from models.pair_training import (
    PairTrainConfig,
    make_pairs,
    pair_accuracy,
    pair_calibration,
    sample_pair_ids,
    train_pair_model,
)
from models.prototypes import PrototypeConfig, PrototypeSet, make_prototype_set
from models.pruning import list_methods
from models.pruning.pair import prune_pair, prune_pair_and_register
from models.pruning.pipeline import prune_and_register
from models.registry import ModelRegistry

torch.set_num_threads(1)

TINY = default_pair_spec(trunk_channels=4, max_shift=2, hidden=(16, 12))
CFG = PrototypeConfig(num_prototypes=60, views=4, seed=1)
ALL_METHODS = [m.name for m in list_methods()]


@cache
def _data() -> tuple[PrototypeSet, PrototypeSet]:
    return make_prototype_set(CFG, "train"), make_prototype_set(replace(CFG, num_prototypes=30), "val")


@cache
def _trained() -> PairNetwork:
    train, val = _data()
    config = PairTrainConfig(steps=120, batch_size=128, eval_every=40, val_pairs=600, lr=1e-2)
    model, _ = train_pair_model(TINY, train, val, config)
    return model


def trained() -> PairNetwork:
    return copy.deepcopy(_trained())


# -- spec and network ----------------------------------------------------------------------------------------
def test_spec_round_trips_and_rejects_nonsense() -> None:
    assert PairSpec.from_dict(TINY.to_dict()) == TINY
    assert TINY.to_dict()["kind"] == "pair" and TINY.kind == "pair"
    # 4 channels x 4 regions x (5 shifts + 2 energies)
    assert TINY.interaction_dim == 4 * 4 * 7 == TINY.scorer.input_dim
    assert default_pair_spec(interaction="positions", regions=1, energies=False).interaction_dim == 40 * 17
    with pytest.raises(ValueError, match="unknown pair spec keys"):
        PairSpec.from_dict({**TINY.to_dict(), "depth": 2})
    with pytest.raises(ValueError, match="kind 'pair'"):
        PairSpec.from_dict({**TINY.to_dict(), "kind": "mlp"})
    with pytest.raises(ValueError, match="interaction_dim"):
        replace(TINY, max_shift=3)
    with pytest.raises(ValueError, match="max_shift"):
        default_pair_spec(max_shift=40)
    with pytest.raises(ValueError, match="regions must divide"):
        default_pair_spec(regions=3)
    with pytest.raises(ValueError, match="trunk_layers"):
        default_pair_spec(trunk_layers=3)


def test_correlate_matches_the_definition_on_both_paths() -> None:
    torch.manual_seed(0)
    fq, fx = torch.randn(1, 3, 9), torch.randn(5, 3, 9)
    s = 2
    ref = torch.zeros(5, 3, 2 * s + 1)
    for j in range(2 * s + 1):
        for t in range(9):
            u = t + j - s
            if 0 <= u < 9:
                ref[:, :, j] += fq[0, :, t] * fx[:, :, u]
    ref /= 9
    torch.testing.assert_close(correlate(fq, fx, s), ref)
    torch.testing.assert_close(correlate(fq.expand(5, -1, -1), fx, s), ref)


def test_correlation_peak_follows_a_translation() -> None:
    """Shifting the item by d moves the autocorrelation peak by d shifts: translation shows up as a shift of
    the features instead of breaking a position-by-position comparison."""
    signal = torch.zeros(1, 1, 30)
    signal[0, 0, 10:16] = torch.tensor([1.0, 3.0, 2.0, 5.0, 1.0, 2.0])
    for d in (-3, 0, 2):
        moved = torch.roll(signal, d, dims=2)
        peak = int(correlate(signal, moved, 4)[0, 0].argmax()) - 4
        assert peak == d


VARIANTS = {
    "default": TINY,
    "one-region": default_pair_spec(trunk_channels=4, max_shift=2, hidden=(16, 12), regions=1, energies=False),
    "positions": default_pair_spec(
        trunk_channels=4, max_shift=2, hidden=(16, 12), interaction="positions", regions=1, trunk_layers=2
    ),
}


@pytest.mark.parametrize("spec", VARIANTS.values(), ids=VARIANTS.keys())
def test_forward_broadcast_cached_features_and_hidden(spec: PairSpec) -> None:
    torch.manual_seed(0)
    model = PairNetwork(spec).eval()
    assert PairSpec.from_dict(spec.to_dict()) == spec
    q, x = torch.randn(1, 40), torch.randn(7, 40)
    logits, h = model.forward_with_hidden(q, x)
    assert logits.shape == (7, 3) and h.shape == (7, spec.scorer.hidden_dim)
    torch.testing.assert_close(model(q.expand(7, -1), x), logits)
    fx = model.item_features(x)
    assert fx.shape == (7, 4, 40)
    torch.testing.assert_close(model.forward_features(model.query_features(q), fx)[0], logits)
    z = model.interaction(q, x)
    assert z.shape == (7, spec.interaction_dim)
    torch.testing.assert_close(model.interaction(q.expand(7, -1), x), z)
    torch.testing.assert_close(model.scorer(z), logits)


@pytest.mark.parametrize("name", ["default", "one-region"])
def test_folding_the_query_gives_the_same_outputs(name: str) -> None:
    torch.manual_seed(1)
    model = PairNetwork(VARIANTS[name])
    with torch.no_grad():  # a non-trivial normalisation, as after training
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    model.eval()
    pruned = prune_pair(model, "magnitude", 0.3)  # masked first layer: folding must keep the zeros' effect
    for m in (model, pruned):
        q, x = torch.randn(1, 40), torch.randn(50, 40)
        fq, fx = m.query_features(q), m.item_features(x)
        logits, hidden = m.forward_features(fq, fx)
        folded = m.fold_query(fq)
        out, h = m.forward_folded(folded, fx)
        torch.testing.assert_close(out, logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(h, hidden, atol=1e-5, rtol=1e-4)
        if m.spec.energies:
            torch.testing.assert_close(m.forward_folded(folded, fx, m.item_energies(fx))[0], out)
        per_pair, per_query = folded_pair_cost(m)
        c, length, h1 = m.spec.trunk_channels, 40, m.scorer.body[0].weight.shape[0]
        r, w = m.spec.regions, m.spec.shifts
        energies = c * r if m.spec.energies else 0  # cached with the item's features
        rest = pair_cost(m).scorer.dense_kernel - 2 * m.scorer.body[0].weight.numel()
        assert per_pair.dense_kernel == 2 * h1 * (c * length + energies) + rest
        trunk = 2 * c * 5 * 40
        query_energies = 2 * c * length + 2 * h1 * c * r if m.spec.energies else 0
        assert per_query.dense_kernel == trunk + 2 * h1 * c * r * w * length + query_energies
    with pytest.raises(ValueError, match="channels"):
        PairNetwork(VARIANTS["positions"]).fold_query(torch.zeros(1, 4, 40))


def test_the_pair_model_reads_the_query() -> None:
    model = trained()
    train, _ = _data()
    x = torch.from_numpy(train.x[:8])
    a = model(torch.from_numpy(train.x[:1]), x)
    b = model(torch.from_numpy(train.x[100:101]), x)
    assert not torch.allclose(a, b)


def test_flops_match_the_torch_counter_where_it_counts() -> None:
    model = PairNetwork(TINY).eval()
    cost = pair_cost(model)
    # per channel, the (L + 2S) padded positions times the R * (2S + 1) Toeplitz columns (zeros included)
    assert cost.interaction.dense_kernel == 2 * 4 * (40 + 4) * 4 * 5
    assert cost.per_pair == cost.interaction + cost.scorer
    folded, fold = folded_pair_cost(model)
    assert pair_flops(model) == folded  # served from cached item inputs: the trunk is counted once per item
    assert pair_query_flops(model) == fold
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.scorer(torch.zeros(1, TINY.interaction_dim))
    assert cost.scorer.dense_kernel == counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.item_features(torch.zeros(1, 40))
    assert cost.per_item.dense_kernel == counter.get_total_flops()
    assert cost.cache_floats_per_item == model.item_input_width == 4 * 40 + 4 * 4  # features + energies


def test_with_scorer_keeps_the_front_end() -> None:
    model = trained()
    pairs = pair_calibration(_data()[0], 32, seed=0)
    pruned = prune_pair(model, "greedy-asymmetric", 0.5, pairs, reweight=True)
    torch.testing.assert_close(pruned.interaction(pairs.q, pairs.x), model.interaction(pairs.q, pairs.x))
    assert pruned.spec.scorer.hidden == (8, 6) and pruned.spec.trunk_channels == model.spec.trunk_channels
    assert model.spec.scorer.hidden == (16, 12)  # the input model is untouched


# -- training ------------------------------------------------------------------------------------------------
def test_pair_sampling_has_the_asked_grades() -> None:
    labels = np.arange(40) % 10
    rng = np.random.default_rng(0)
    qid, xid, grade = sample_pair_ids(labels, 3000, (0.2, 0.4, 0.4), rng)
    assert np.allclose(np.bincount(grade, minlength=3) / 3000, [0.2, 0.4, 0.4], atol=0.04)
    assert (qid[grade == 2] == xid[grade == 2]).all()
    g1 = grade == 1
    assert (labels[qid[g1]] == labels[xid[g1]]).all() and (qid[g1] != xid[g1]).all()
    assert (labels[qid[grade == 0]] != labels[xid[grade == 0]]).all()


def test_training_learns_grades_and_records_the_prior() -> None:
    train, val = _data()
    config = PairTrainConfig(steps=120, batch_size=128, eval_every=40, val_pairs=600, lr=1e-2)
    model, report = train_pair_model(TINY, train, val, config)
    assert report.grade_prior == pytest.approx((0.2, 0.4, 0.4))
    untrained = PairNetwork(TINY)
    probes = make_pairs(val, 900, (1 / 3, 1 / 3, 1 / 3), np.random.default_rng(5))
    assert pair_accuracy(model, probes) > pair_accuracy(untrained, probes) + 0.1
    assert pair_accuracy(model, probes) > 0.42  # chance is 1/3
    with pytest.raises(ValueError, match="grade_mix"):
        train_pair_model(TINY, train, val, replace(config, grade_mix=(0.5, 0.5)))


# -- bi-encoder ----------------------------------------------------------------------------------------------
def test_biencoder_spec_embeds_unit_vectors_and_learns_views(tmp_path: Path) -> None:
    spec = BiEncoderSpec(channels=(8, 8), hidden=32, embed_dim=16)
    assert BiEncoderSpec.from_dict(spec.to_dict()) == spec
    train, val = _data()
    model = train_biencoder(train, val, BiEncoderTrainConfig(steps=60, batch_prototypes=48, eval_every=30), spec)
    emb = model.embed(torch.from_numpy(val.x)).detach()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(emb)))
    cents = cluster_centroids(emb.numpy(), val.cluster)
    own = (emb.numpy() * cents[val.cluster]).sum(1).mean()
    other = (emb.numpy() @ cents.T).mean()
    assert own > other + 0.2
    save_biencoder(model, tmp_path / "bi")
    torch.testing.assert_close(load_biencoder(tmp_path / "bi").embed(torch.from_numpy(val.x)), emb)
    (tmp_path / "bi" / "biencoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="sha256"):
        load_biencoder(tmp_path / "bi")
    untrained = BiEncoder(spec).embed(torch.from_numpy(val.x)).detach().numpy()
    c0 = cluster_centroids(untrained, val.cluster)
    assert own - other > (untrained * c0[val.cluster]).sum(1).mean() - (untrained @ c0.T).mean()


# -- pruning with every method and the registry --------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_prunes_a_pair_model_and_it_round_trips(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = trained()
    kind = next(m.kind for m in list_methods() if m.name == method)
    pairs = pair_calibration(_data()[0], 96, seed=0)
    pruned = prune_pair(model, method, 0.4, pairs)
    before, after = pair_flops(model), pair_flops(pruned)
    if kind == "structured":
        assert after.dense_kernel < before.dense_kernel
    else:
        assert after.nonzero < before.nonzero and after.dense_kernel == before.dense_kernel
    logits, h = pruned.forward_with_hidden(pairs.q[:1], pairs.x)
    assert torch.isfinite(logits).all() and h.shape[0] == len(pairs)
    registry = ModelRegistry(tmp_path)
    manifest = registry.register("pair-x", pruned, accuracy=0.5, method=method, keep=0.4)
    assert manifest.model_kind == "pair" and manifest.spec["kind"] == "pair"
    assert manifest.flops_nonzero == after.nonzero and manifest.flops_dense_kernel == after.dense_kernel
    loaded = registry.load("pair-x")
    assert isinstance(loaded.model, PairNetwork) and loaded.model.spec == pruned.spec
    torch.testing.assert_close(loaded.model(pairs.q, pairs.x), pruned.eval()(pairs.q, pairs.x))


def test_manifest_checks_pair_specs_and_keeps_classifiers() -> None:
    fields = dict(name="p", version=1, flops_dense_kernel=1, flops_nonzero=1, accuracy=0.5, sha256="0" * 64)
    m = Manifest(spec=TINY.to_dict(), **fields)
    assert m.model_kind == "pair" and m.pair_spec == TINY and m.model_spec == TINY
    assert m.network_spec == TINY.scorer
    bad = TINY.to_dict()
    bad["scorer"] = {**bad["scorer"], "input_dim": 7}
    with pytest.raises(ValidationError, match="interaction_dim"):
        Manifest(spec=bad, **fields)
    c = Manifest(spec=TINY.scorer.to_dict(), **fields)
    assert c.model_kind == "classifier" and c.model_spec == TINY.scorer
    with pytest.raises(TypeError, match="classifier"):
        _ = c.pair_spec


def test_prune_pair_and_register_fine_tunes_the_scorer_only(tmp_path: Path) -> None:
    train, val = _data()
    registry = ModelRegistry(tmp_path)
    dense = trained()
    registry.register("pair-dense", dense, accuracy=0.6, extra={"grade_prior": [0.2, 0.4, 0.4], "epochs_run": 3})
    manifest = prune_pair_and_register(
        registry,
        "pair-dense",
        "greedy-asymmetric",
        0.25,
        "pair-s25",
        train,
        val,
        reweight=True,
        finetune_steps=20,
        finetune=PairTrainConfig(batch_size=64, eval_every=10, val_pairs=300, lr=1e-3),
        calibration_size=96,
    )
    assert manifest.parent == "pair-dense:1" and manifest.extra["grade_prior"] == [0.2, 0.4, 0.4]
    assert "epochs_run" not in manifest.extra and manifest.extra["finetune_steps"] == 20
    assert manifest.flops_dense_kernel < registry.manifest("pair-dense").flops_dense_kernel
    pruned = registry.load("pair-s25").model
    assert isinstance(pruned, PairNetwork)
    for a, b in zip(pruned.trunk.parameters(), dense.trunk.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the cached item features of the parent stay valid
    torch.testing.assert_close(pruned.norm.running_mean, dense.norm.running_mean)
    with pytest.raises(ValueError, match="prune_pair_and_register"):
        prune_and_register(registry, "pair-dense", "magnitude", 0.5, "pair-m50", None)  # type: ignore[arg-type]
    registry.register("clf", copy.deepcopy(dense.scorer), accuracy=0.5)
    with pytest.raises(ValueError, match="not a pair model"):
        prune_pair_and_register(registry, "clf", "magnitude", 0.5, "clf-m", train, val)


def _nontrivial(spec: PairSpec, seed: int) -> PairNetwork:
    torch.manual_seed(seed)
    model = PairNetwork(spec)
    with torch.no_grad():  # a non-trivial normalisation, as after training
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_item_inputs_give_the_plain_forward_on_both_paths(name: str) -> None:
    model = _nontrivial(VARIANTS[name], 2)
    q, x = torch.randn(1, 40), torch.randn(60, 40)
    with torch.no_grad():
        want_logits, want_hidden = model.forward_with_hidden(q, x)
        inputs = model.item_inputs(x)
        assert inputs.shape == (60, model.item_input_width)
        fq = model.query_features(q)
        prepared = [fq, model.prepare(q, 1), model.prepare(q, 10**6)]
        if model.spec.interaction == "channels":  # folding exists for 'channels' models, whether or not it pays
            prepared.append(model.fold_query(fq))
        else:
            assert not model.folds(10**6)
        for p in prepared:
            logits, hidden = model.score_prepared(p, inputs)
            torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.score(q, x)[0], want_logits, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="item inputs"):
            model.score_prepared(model.prepare(q, 1), x)  # raw items are not item inputs


def test_the_fold_follows_the_weights() -> None:
    """The fold's query-independent part is computed once per set of weights; changing a weight in place
    (training, a load) must not serve a stale fold."""
    model = _nontrivial(VARIANTS["default"], 3)
    q, x = torch.randn(1, 40), torch.randn(30, 40)
    with torch.no_grad():
        inputs = model.item_inputs(x)
        before = model.score_prepared(model.prepare(q, 10**6), inputs)[0]
        model.scorer.body[0].weight.mul_(0.5)
        model.norm.running_var.mul_(2.0)
        after = model.score_prepared(model.prepare(q, 10**6), inputs)[0]
        torch.testing.assert_close(after, model.forward_with_hidden(q, x)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", ["default", "one-region"])
def test_flops_per_query_equal_a_hand_count_and_the_torch_counter(name: str) -> None:
    model = _nontrivial(VARIANTS[name], 4)
    spec = model.spec
    c, length, r, w, s = spec.trunk_channels, 40, spec.regions, spec.shifts, spec.max_shift
    h1 = model.scorer.body[0].weight.shape[0]
    scorer = pair_cost(model).scorer.dense_kernel
    rest = scorer - 2 * h1 * spec.interaction_dim
    trunk = 2 * c * 5 * 40
    energies = c * r if spec.energies else 0
    plain_pair = 2 * c * (length + 2 * s) * r * w + scorer
    plain_query = trunk + (2 * c * length if spec.energies else 0)
    folded_pair = 2 * h1 * (c * length + energies) + rest
    folded_query = trunk + 2 * h1 * c * r * w * length + (2 * c * length + 2 * h1 * energies if spec.energies else 0)
    # folding pays past this many items, if it ever does (not with one region: fewer correlation numbers)
    crossover = (folded_query - plain_query) / (plain_pair - folded_pair) if plain_pair > folded_pair else math.inf
    assert (crossover < 200) == (name == "default")
    for n in (1, 2, 50, 150, 151, 500) if math.isinf(crossover) else (1, 2, int(crossover), int(crossover) + 1, 500):
        want = min(plain_query + n * plain_pair, folded_query + n * folded_pair)
        assert model.flops(n).dense_kernel == want
        assert model.folds(n) == (n > crossover)
    # the torch counter sees the same matrix products (it skips elementwise work, the energies' squares, and
    # matrix-vector products, the query energies' share of the folded bias)
    q, x = torch.randn(1, 40), torch.randn(50, 40)
    with torch.no_grad():
        inputs = model.item_inputs(x)
        model.flops(1)  # the cost table is built outside the counter
        for prepare, (pair, query) in (
            (lambda: model.query_features(q), (plain_pair, plain_query)),
            (lambda: model.fold_query(model.query_features(q)), (folded_pair, folded_query)),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                prepared = prepare()
            uncounted = 2 * c * length if spec.energies else 0
            if spec.energies and isinstance(prepared, FoldedQuery):
                uncounted += 2 * h1 * energies
            assert counter.get_total_flops() == query - uncounted
            counter = FlopCounterMode(display=False)
            with counter:
                model.score_prepared(prepared, inputs)
            assert counter.get_total_flops() == 50 * pair


def test_item_inputs_key_is_shared_by_pruned_variants_and_follows_the_trunk() -> None:
    model = _nontrivial(VARIANTS["default"], 5)
    pruned = prune_pair(model, "magnitude", 0.3)
    assert pruned.item_inputs_key() == model.item_inputs_key()  # one cache serves both
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.trunk[0].weight.add_(0.01)
    assert other.item_inputs_key() != model.item_inputs_key()
    assert PairNetwork(VARIANTS["positions"]).item_inputs_key() != model.item_inputs_key()
    cost = model.item_input_flops()
    assert cost.dense_kernel == 2 * 4 * 5 * 40 + 2 * 4 * 40  # the trunk and the item energies, once per item
