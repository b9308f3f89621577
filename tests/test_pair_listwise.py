"""Pair models with a retriever (the stage-0 bi-encoder's score as a residual), their listwise training on the
retriever's candidate lists and the distillation of their pruned variants, on tiny models."""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.target import Target, ranking_key
from models.biencoder import BiEncoder, BiEncoderSpec
from models.biencoder_training import BiEncoderTrainConfig, train_biencoder
from models.pair import PairNetwork, PairSpec, RetrieverQuery, default_pair_spec, pair_flops
from models.pair_training import (
    ListwiseConfig,
    distillation_loss,
    group_logits,
    group_top1,
    listwise_loss,
    retriever_lists,
    sample_groups,
    train_pair_listwise,
)
from models.pair_training import ranking_key as training_key
from models.prototypes import PrototypeConfig, PrototypeSet, make_prototype_set, member_set
from models.pruning.pair import prune_pair, prune_pair_and_register
from models.registry import ModelRegistry
from models.scorer import cluster_context, item_inputs

torch.set_num_threads(1)

CFG = PrototypeConfig(num_prototypes=80, views=4, seed=3)
TINY_RETRIEVER = BiEncoderSpec(channels=(8, 8), hidden=16, embed_dim=8)
LISTWISE = ListwiseConfig(steps=60, queries=16, group=6, members=2, top=12, eval_every=20, val_queries=64, lr=3e-3)


@cache
def _data() -> tuple[PrototypeSet, PrototypeSet]:
    return make_prototype_set(CFG, "train"), make_prototype_set(replace(CFG, num_prototypes=40), "val")


@cache
def _retriever() -> BiEncoder:
    train, val = _data()
    return train_biencoder(
        train, val, BiEncoderTrainConfig(steps=60, batch_prototypes=40, eval_every=30), TINY_RETRIEVER
    )


def fresh_model(seed: int = 0) -> PairNetwork:
    torch.manual_seed(seed)
    spec = replace(default_pair_spec(trunk_channels=4, max_shift=2, hidden=(16, 12)), retriever=TINY_RETRIEVER)
    model = PairNetwork(spec)
    assert model.retriever is not None
    model.retriever.load_state_dict(_retriever().state_dict())
    return model.eval()


@cache
def _trained() -> PairNetwork:
    train, val = _data()
    model, _ = train_pair_listwise(fresh_model(), train, val, LISTWISE)
    return model


def trained() -> PairNetwork:
    return copy.deepcopy(_trained())


def test_spec_with_a_retriever_round_trips_and_refuses_untrusted_numbers() -> None:
    spec = fresh_model().spec
    assert PairSpec.from_dict(spec.to_dict()) == spec
    d = spec.to_dict()
    for bad in (
        {**d["retriever"], "channels": [8, 1e300]},
        {**d["retriever"], "embed_dim": float("inf")},
        {**d["retriever"], "hidden": "16"},
        {**d["retriever"], "surprise": 1},
        {**d["retriever"], "input_dim": 39},
        [1, 2],
    ):
        with pytest.raises(ValueError, match="retriever"):
            PairSpec.from_dict({**d, "retriever": bad})
    assert PairSpec.from_dict({**d, "retriever": None}).retriever is None


def test_served_path_equals_the_forward_with_each_clusters_centroid() -> None:
    model = trained()
    space = make_prototype_set(replace(CFG, num_prototypes=12), "space")
    x = torch.from_numpy(space.x)
    offsets = np.arange(0, len(x) + 1, CFG.views)
    context = cluster_context(model, x, offsets)
    assert context is not None and context.shape == (len(x), TINY_RETRIEVER.embed_dim)
    # every member carries its cluster's mean retriever embedding (FAISS's centroid)
    emb = model.retriever_embedding(x).detach()
    np.testing.assert_allclose(context[5].numpy(), emb[4:8].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    table = item_inputs(model, x, context)
    assert table.shape == (len(x), model.item_input_width)
    q = torch.from_numpy(make_prototype_set(replace(CFG, num_prototypes=12), "val").x[:1])
    with torch.no_grad():
        expected = model(q, x, context)
        for n in (1, 10**6):  # plain and folded paths
            prepared = model.prepare(q, n)
            assert isinstance(prepared, RetrieverQuery)
            torch.testing.assert_close(model.score_prepared(prepared, table)[0], expected, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="item inputs"):
            model.score_prepared(model.prepare(q, 10**6), table[:, :-1])
        with pytest.raises(ValueError, match="retriever"):  # a bare trunk query misses the retriever's half
            model.score_prepared(model.query_features(q), table)


def test_a_fresh_model_starts_from_the_retrievers_ranking() -> None:
    """With the scorer's output constant, the cluster ranking is FAISS's (-||e(q) - centroid||^2)."""
    model = fresh_model()
    with torch.no_grad():
        head = model.scorer.head
        head.weight.zero_()
        head.bias.zero_()
    space = make_prototype_set(replace(CFG, num_prototypes=30), "space")
    x = torch.from_numpy(space.x)
    offsets = np.arange(0, len(x) + 1, CFG.views)
    table = item_inputs(model, x, cluster_context(model, x, offsets))
    q = torch.from_numpy(make_prototype_set(replace(CFG, num_prototypes=30), "val").x[:3])
    with torch.no_grad():
        for i in range(3):
            logits = model.score_prepared(model.prepare(q[i : i + 1], len(x)), table)[0]
            cluster_logits = logits.reshape(30, CFG.views, -1).mean(1)  # mean_logit
            target = Target(utility=np.array([0.0, 1.0, 3.0]), kind="pair")
            keys = ranking_key(torch.log_softmax(cluster_logits, 1), target).numpy()
            eq = model.retriever_embedding(q[i : i + 1])
            centroids = model.retriever_embedding(x).reshape(30, CFG.views, -1).mean(1)
            faiss = -((eq - centroids) ** 2).sum(1).numpy()
            np.testing.assert_array_equal(np.argsort(-keys, kind="stable"), np.argsort(-faiss, kind="stable"))


def test_groups_are_the_retrievers_own_candidates() -> None:
    train, _ = _data()
    retriever = _retriever()
    lists = retriever_lists(train, retriever)
    config = replace(LISTWISE, group=5, top=6)
    batch = sample_groups(lists, retriever, 20, config, np.random.default_rng(0))
    b, g = batch.shape
    assert (b, g) == (20, 5) and len(batch.x) == 20 * 5 * config.members
    assert bool((batch.grade[:, 0] == 2).all()) and not bool((batch.grade[:, 1:] == 2).any())
    # every negative is among the query's `top` nearest centroids by the retriever's distance
    with torch.no_grad():
        eq = retriever.embed(batch.q).double().numpy()
    dist = ((eq[:, None, :] - lists.centroids[None, :, :]) ** 2).sum(-1)
    own = np.argmin(np.abs(batch.context.numpy()[:: g * config.members, None, :] - lists.centroids[None]).sum(-1), 1)
    dist[np.arange(b), own] = np.inf
    nearest = np.argsort(dist, axis=1)[:, : config.top]
    members = batch.context.numpy().reshape(b, g, config.members, -1)[:, 1:, 0, :]
    ids = np.argmin(np.abs(members[:, :, None, :] - lists.centroids[None, None]).sum(-1), -1)
    assert all(set(ids[i]) <= set(nearest[i]) for i in range(b))


def test_groups_of_a_users_clusters_leave_the_query_out() -> None:
    train, _ = _data()
    users = member_set(train.x, train.y, train.cluster)  # stored members stand in for rendered views
    retriever = _retriever()
    lists = retriever_lists(users, retriever)
    n = 3
    batch = sample_groups(lists, retriever, 30, replace(LISTWISE, members=n), np.random.default_rng(1))
    own_members = batch.x.reshape(30, LISTWISE.group, n, -1)[:, 0]
    assert not bool((own_members == batch.q[:, None, :]).all(-1).any())  # never the query itself
    # the own cluster's centroid leaves the query out: (size * mean - e(q)) / (size - 1)
    rows = np.array([int(np.flatnonzero((users.x == q).all(1))[0]) for q in batch.q.numpy()])
    own = users.cluster[rows]
    size = np.diff(lists.offsets)[own][:, None]
    expected = (lists.centroids[own] * size - lists.embedding[rows]) / (size - 1)
    got = batch.context.numpy().reshape(30, LISTWISE.group, n, -1)[:, 0, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_the_training_key_is_the_served_key() -> None:
    logits = torch.randn(50, 3, dtype=torch.float64)
    target = Target(utility=np.array([0.0, 1.0, 3.0]), kind="pair")
    served = ranking_key(torch.log_softmax(logits, 1), target)
    torch.testing.assert_close(
        training_key(torch.log_softmax(logits, 1), torch.tensor([0.0, 1.0, 3.0]).double()), served
    )


def test_the_listwise_loss_rewards_the_own_cluster_first() -> None:
    grade = torch.tensor([[2, 1, 1, 0]])
    right = torch.tensor([[[0.0, 0.0, 4.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]])
    wrong = right[:, [1, 0, 2, 3]]  # a look-alike holds the own cluster's logits
    assert listwise_loss(right, grade, 0.0) < listwise_loss(wrong, grade, 0.0)
    assert listwise_loss(right, grade, 0.5) < listwise_loss(wrong, grade, 0.5)


def test_descending_the_listwise_loss_ranks_the_own_cluster_higher() -> None:
    """The objective: gradient steps on a fixed batch of the retriever's groups lower the loss and lift the own
    cluster's ranking key over the look-alikes'."""
    train, _ = _data()
    lists = retriever_lists(train, _retriever())
    batch = sample_groups(lists, _retriever(), 32, LISTWISE, np.random.default_rng(2))
    model = fresh_model().train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def margin() -> float:
        with torch.no_grad():
            keys = training_key(torch.log_softmax(group_logits(model.eval(), batch), -1), torch.tensor([0.0, 1.0, 3.0]))
        model.train()
        return float((keys[:, 0] - keys[:, 1:].max(1).values).mean())

    before_margin = margin()
    losses = []
    for _ in range(30):
        loss = listwise_loss(group_logits(model, batch), batch.grade, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and margin() > before_margin


def test_listwise_training_keeps_its_best_validation_checkpoint() -> None:
    """It starts from the retriever's ranking and returns the weights with the best top-1 on validation groups,
    so it never ends below where it started there; the grade prior is the groups' grade frequencies."""
    train, val = _data()
    model, report = train_pair_listwise(fresh_model(), train, val, replace(LISTWISE, steps=30, eval_every=10))
    assert report.best_step in (0, 10, 20, 30) and report.steps_run == 30
    assert abs(sum(report.grade_prior) - 1) < 1e-9 and report.grade_prior[2] == pytest.approx(1 / LISTWISE.group)
    lists = retriever_lists(val, _retriever())
    val_rng = np.random.default_rng([0, 67])  # the validation groups `train_pair_listwise` draws
    config = replace(LISTWISE, group=LISTWISE.top + 1)  # validation groups: the own cluster and the whole top
    batches = [sample_groups(lists, _retriever(), 64, config, val_rng) for _ in range(LISTWISE.val_queries // 64)]
    assert group_top1(model, batches) == pytest.approx(report.val_accuracy)
    assert report.val_accuracy >= group_top1(fresh_model(), batches)


def test_distillation_brings_a_pruned_variant_closer_to_the_dense_model() -> None:
    train, val = _data()
    dense = trained()
    pruned = prune_pair(dense, "magnitude", 0.2)
    lists = retriever_lists(val, _retriever())
    batch = sample_groups(lists, _retriever(), 64, LISTWISE, np.random.default_rng(9))
    with torch.no_grad():
        teacher = group_logits(dense.eval(), batch)
        before = float(distillation_loss(group_logits(pruned.eval(), batch), teacher, "margin"))
    config = replace(LISTWISE, steps=40, eval_every=40)
    student, _ = train_pair_listwise(pruned, train, val, config, train_front=False, teacher=dense, distill="margin")
    with torch.no_grad():
        after = float(distillation_loss(group_logits(student, batch), teacher, "margin"))
    assert after < before, (before, after)
    for name, a in dense.named_parameters():  # the front end (trunk, residual, retriever) stays the parent's
        if not name.startswith("scorer."):
            torch.testing.assert_close(a, dict(student.named_parameters())[name])
    assert student.item_inputs_key() == dense.item_inputs_key()


def test_pruned_variants_are_distilled_and_registered(tmp_path: Path) -> None:
    train, val = _data()
    registry = ModelRegistry(tmp_path / "registry")
    registry.register("pair-dense", trained(), accuracy=0.5, dataset="tiny", extra={"grade_prior": [0.3, 0.5, 0.2]})
    config = replace(LISTWISE, steps=20, eval_every=20)
    for distill in ("margin", "logits", None):
        manifest = prune_pair_and_register(
            registry, "pair-dense", "magnitude", 0.3, f"pair-m30-{distill or 'labels'}", train, val,
            finetune_steps=20, listwise=config, distill=distill,
        )  # fmt: skip
        expected = "listwise on labels" if distill is None else f"distilled ({distill})"
        assert manifest.extra["finetune"] == expected and manifest.extra["grade_prior"] == [0.3, 0.5, 0.2]
        loaded = registry.load(f"pair-m30-{distill or 'labels'}")
        assert isinstance(loaded.model, PairNetwork) and loaded.model.retriever is not None
        assert loaded.model.item_inputs_key() == trained().item_inputs_key()
    flops = pair_flops(registry.load("pair-m30-margin").model)
    assert flops.nonzero < pair_flops(trained()).nonzero
