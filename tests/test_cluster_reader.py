"""The cluster reader (models/cluster_reader.py): it starts at its retriever's ranking, reads members as a set,
counts its FLOPs by the members it reads, and its listwise objective teaches it to find a query's own cluster
among clusters it never saw in training (a tiny synthetic space: shifted, noisy copies of random templates)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models.biencoder import BiEncoder, BiEncoderSpec
from models.cluster_reader import (
    FIRST_SERVED_SHAPE,
    ClusterReader,
    MemberFeatures,
    ReaderRanker,
    ReaderSpec,
    build_ranker,
    listwise_loss,
)

LENGTH = 16


def _views(templates: torch.Tensor, cluster: torch.Tensor, gen: torch.Generator, noise: float = 0.4) -> torch.Tensor:
    """One view per entry of `cluster`: its template circularly shifted by -2..2 positions, plus noise."""
    shifts = torch.randint(-2, 3, cluster.shape, generator=gen)
    base = templates[cluster]
    idx = (torch.arange(LENGTH) - shifts[..., None]) % LENGTH
    return torch.gather(base, -1, idx) + noise * torch.randn(base.shape, generator=gen)


def _groups(templates: torch.Tensor, b: int, g: int, n: int, gen: torch.Generator):
    """b queries, each with its own cluster first and g - 1 others, n members each; retriever scores all zero."""
    k = len(templates)
    own = torch.randint(0, k, (b,), generator=gen)
    others = (own[:, None] + torch.randint(1, k, (b, g - 1), generator=gen)) % k
    clusters = torch.cat([own[:, None], others], 1)
    members = _views(templates, clusters[..., None].expand(b, g, n), gen)
    return _views(templates, own, gen), members, torch.zeros(b, g)


def _ranker(mode: str = "xattn", seed: int = 0, **options: Any) -> ReaderRanker:
    """A tiny reader; `options`: the lab's (context, nearest, shift, upsample)."""
    torch.manual_seed(seed)
    encoder = BiEncoder(BiEncoderSpec(input_dim=LENGTH, channels=(8, 8), hidden=16, embed_dim=8))
    sample = torch.randn(256, LENGTH)
    trunk = MemberFeatures(encoder, "c1", trainable=False, sample=sample)
    reader = ClusterReader(channels=9, length=LENGTH, mode=mode, d=8, dv=8, hidden=16, max_shift=4, **options)
    reader.init_identity()
    return ReaderRanker(trunk, reader)


def test_an_untrained_reader_ranks_exactly_as_its_retriever() -> None:
    ranker = _ranker()
    gen = torch.Generator().manual_seed(1)
    q, members, _ = _groups(torch.randn(20, LENGTH, generator=gen), 4, 5, 3, gen)
    retriever = torch.randn(4, 5, generator=gen)
    with torch.no_grad():
        ranker.reader.log_alpha.fill_(0.7)
        keys = ranker.scores(q, members, retriever)
        ranker.residual = False
        alone = ranker.scores(q, members, retriever)
    assert torch.equal(keys, torch.exp(torch.tensor(0.7)) * retriever)
    assert torch.equal(alone, torch.zeros(4, 5))


FORMULA_CASES = [
    ("xattn", 0, False, False, 1),
    ("maxsim", 0, False, False, 1),
    ("xattn", 5, False, False, 1),
    ("xattn", 3, True, False, 1),
    ("xattn", 0, False, True, 1),
    ("xattn", 0, False, True, 3),
]


@pytest.mark.parametrize(("mode", "context", "nearest", "shift", "upsample"), FORMULA_CASES)
def test_the_forward_computes_its_formula_and_trains_through_it(
    mode: str, context: int, nearest: bool, shift: bool, upsample: int
) -> None:
    """The forward (one shared exp, masked logits clamped, the variance as a mean square), served and trained,
    against the formula written with torch's own logsumexp, softmax and var: the same scores, and in training the
    same gradient for every parameter (the shift bias included). The lab's options read more: a conv over the
    residual's positions (`context`), the nearest aligned member (`nearest`), how far the alignment moved
    (`shift`), members at `upsample` points a sample."""
    reader = _ranker(mode, context=context, nearest=nearest, shift=shift, upsample=upsample).reader
    lu = upsample * (LENGTH - 1) + 1
    if context:
        torch.nn.init.normal_(reader.whiten.weight)  # past its identity start
    for p in (reader.mlp[-1].weight, reader.scale, reader.rel):
        torch.nn.init.normal_(p)  # an opinion, a learnt shift bias
    gen = torch.Generator().manual_seed(2)
    qq, qv = torch.randn(6, LENGTH, 8, generator=gen), torch.randn(6, LENGTH, 8, generator=gen)
    k, v = 3 * torch.randn(6, 5, lu, 8, generator=gen), torch.randn(6, 5, lu, 8, generator=gen)
    moved = torch.arange(LENGTH)[:, None] - torch.arange(lu)[None, :] / upsample  # query minus member position
    mask = torch.where(moved.abs() <= 4, 0.0, -1e4)  # max_shift 4
    logits = torch.einsum("pqd,pnld->pnql", qq, k) + reader.rel[reader.rel_idx] + mask
    lse = torch.logsumexp(logits, -1)
    if mode == "maxsim":
        want = reader.scale * lse.mean(1).sum(-1)
    else:
        aligned = torch.einsum("pnql,pnlv->pnqv", logits.softmax(-1), v)
        m, spread = aligned.mean(1), aligned.var(1, unbiased=False)
        parts = [qv, m, qv - m, (qv - m) ** 2, spread, lse.mean(1)[..., None]]
        if context:
            white = torch.nn.functional.conv1d(
                (qv - m).transpose(1, 2), reader.whiten.weight, reader.whiten.bias, padding=context // 2
            ).transpose(1, 2)
            parts += [white, white**2]
        if nearest:
            parts.append(((qv[:, None] - aligned) ** 2).min(1).values)
        if shift:
            each = (logits.softmax(-1) * moved / 4).sum(-1)  # (P, n, L), in units of 4 samples
            parts += [each.mean(1)[..., None], each.mean(1)[..., None] ** 2, each.var(1, unbiased=False)[..., None]]
        feats = torch.cat(parts, -1)
        want = reader.mlp(feats).squeeze(-1).sum(-1)
    with torch.inference_mode():  # serving's path
        served = reader(qq, qv, k, v)
    assert torch.allclose(served, want, rtol=1e-5, atol=1e-5)
    params = [p for p in reader.parameters() if p.requires_grad]
    want_grads = torch.autograd.grad(want.sum(), params, allow_unused=True, retain_graph=True)
    got = reader(qq, qv, k, v)  # training's path
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad(got.sum(), params, allow_unused=True)
    names = [n for n, p in reader.named_parameters() if p.requires_grad]
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        assert (g is None) == (w is None), name
        assert g is None or torch.allclose(g, w, rtol=1e-4, atol=1e-4), (name, (g - w).abs().max())
    assert bool(got_grads[params.index(reader.rel)].abs().sum() > 0)  # the shift bias learns


def test_the_rigid_reader_moves_each_member_by_one_soft_shift() -> None:
    """`rigid` against its formula written out with loops: each shift s of a member scored by the mean over query
    positions p of the logit (p, p + s) plus a learnt prior, the member moved by the softmax over s (renormalised
    where p + s leaves the member), the cluster's mean strength and shift statistics read beside the values."""
    reader = _ranker("rigid").reader
    for p in (reader.mlp[-1].weight, reader.shift_prior):
        torch.nn.init.normal_(p)
    gen = torch.Generator().manual_seed(3)
    qq, qv = torch.randn(2, LENGTH, 8, generator=gen), torch.randn(2, LENGTH, 8, generator=gen)
    k, v = 3 * torch.randn(2, 4, LENGTH, 8, generator=gen), torch.randn(2, 4, LENGTH, 8, generator=gen)
    shifts = range(-4, 5)  # max_shift 4
    want = []
    for i in range(2):
        aligned, strength, moved = [], [], []
        for j in range(4):
            logit = qq[i] @ k[i, j].T  # (query position, member position)
            corr = torch.stack(
                [torch.stack([logit[p, p + s] for p in range(LENGTH) if 0 <= p + s < LENGTH]).mean() for s in shifts]
            )
            corr = corr + reader.shift_prior
            w = corr.softmax(0)
            strength.append(corr.logsumexp(0))
            moved.append(sum(w[a] * s / 4 for a, s in enumerate(shifts)))
            rows = []
            for p in range(LENGTH):
                inside = [(a, s) for a, s in enumerate(shifts) if 0 <= p + s < LENGTH]
                rows.append(sum(w[a] * v[i, j, p + s] for a, s in inside) / sum(w[a] for a, _ in inside))
            aligned.append(torch.stack(rows))
        aligned_t, moved_t = torch.stack(aligned), torch.stack(moved)
        m, spread = aligned_t.mean(0), aligned_t.var(0, unbiased=False)
        cluster = torch.stack(
            [torch.stack(strength).mean(), moved_t.mean(), moved_t.mean() ** 2, moved_t.var(unbiased=False)]
        )
        feats = torch.cat([qv[i], m, qv[i] - m, (qv[i] - m) ** 2, spread, cluster.expand(LENGTH, 4)], -1)
        want.append(reader.mlp(feats).squeeze(-1).sum())
    got = reader(qq, qv, k, v)
    assert torch.allclose(got, torch.stack(want), rtol=1e-4, atol=1e-4)
    grad = torch.autograd.grad(got.sum(), reader.shift_prior)[0]
    assert bool(grad.abs().sum() > 0)  # the prior over shifts learns


def test_the_template_reader_aligns_the_members_to_each_other_first() -> None:
    """Members that are one signal moved by up to two samples make a template with (nearly) no spread, equal to the
    signal in the middle; the reader's score is the query read against that template, whatever the members'
    order."""
    reader = _ranker("template").reader
    torch.nn.init.normal_(reader.mlp[-1].weight)
    gen = torch.Generator().manual_seed(4)
    signal = torch.randn(1, LENGTH + 8, 8, generator=gen)
    moves = (-2, -1, 0, 1, 2, 0)
    k = torch.stack([signal[0, 4 + m : 4 + m + LENGTH] for m in moves])[None]
    with torch.no_grad():
        reader.align_scale.fill_(20.0)  # a sharp alignment
        tk, tv, ts = reader.template(k, k)
    assert float(ts[0, 6:-6].abs().max()) < 1e-3
    assert float((tv[0, 6:-6] - signal[0, 10 : LENGTH - 2]).abs().max()) < 1e-2
    qq, qv = torch.randn(1, LENGTH, 8, generator=gen), torch.randn(1, LENGTH, 8, generator=gen)
    got = reader(qq, qv, k, k)
    assert torch.allclose(got, reader._template_read(qq, qv, tk, tv, ts), atol=1e-5)
    assert torch.allclose(got, reader(qq, qv, k[:, [3, 0, 5, 1, 4, 2]], k[:, [3, 0, 5, 1, 4, 2]]), atol=1e-4)


def test_the_reader_reads_members_as_a_set() -> None:
    ranker = _ranker()
    torch.nn.init.normal_(ranker.reader.mlp[-1].weight)  # a reader with an opinion
    gen = torch.Generator().manual_seed(2)
    q, members, rs = _groups(torch.randn(20, LENGTH, generator=gen), 3, 4, 5, gen)
    with torch.no_grad():
        keys = ranker.scores(q, members, rs)
        shuffled = ranker.scores(q, members[:, :, torch.randperm(5, generator=gen)], rs)
        changed = members.clone()
        changed[:, :, 0] = torch.randn(changed[:, :, 0].shape, generator=gen)
        other = ranker.scores(q, changed, rs)
    assert torch.allclose(keys, shuffled, atol=1e-5)
    assert not torch.allclose(keys, other, atol=1e-3)


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("xattn", {}),
        ("maxsim", {}),
        ("xattn", {"context": 5, "nearest": True}),
        ("xattn", {"shift": True, "upsample": 2}),
    ],
)
def test_flops_per_pair_grow_by_the_same_amount_per_member_read(mode: str, options: dict[str, Any]) -> None:
    reader = _ranker(mode, **options).reader
    per = [reader.flops_per_pair(n) for n in (1, 2, 3, 10)]
    assert per[1] - per[0] == per[2] - per[1] > 0
    assert per[3] == per[0] + 9 * (per[1] - per[0])
    if mode == "maxsim":
        assert per[3] < _ranker("xattn").reader.flops_per_pair(10)


def test_listwise_training_finds_the_own_cluster_among_clusters_never_seen() -> None:
    ranker = _ranker()
    ranker.residual = False
    gen = torch.Generator().manual_seed(3)
    train, held = torch.randn(64, LENGTH, generator=gen), torch.randn(64, LENGTH, generator=gen)
    eval_groups = [_groups(held, 32, 4, 4, gen) for _ in range(4)]

    def top1() -> float:
        with torch.no_grad():
            keys = torch.cat([ranker.scores(*grp) for grp in eval_groups])
        return float((keys[:, 0] > keys[:, 1:].max(1).values).float().mean())  # a tie is a miss

    before = top1()
    params = [p for p in ranker.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(80):
        loss = listwise_loss(ranker.scores(*_groups(train, 16, 4, 4, gen)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = top1()
    assert before == 0.0  # untrained, every key ties: no cluster is found
    assert after >= 0.8, after  # chance is 0.25; 0.91-0.98 measured over three initial weights


def test_unknown_features_and_modes_are_refused() -> None:
    encoder = BiEncoder(BiEncoderSpec(input_dim=LENGTH, channels=(8, 8), hidden=16, embed_dim=8))
    with pytest.raises(ValueError, match="unknown feature"):
        MemberFeatures(encoder, "c3", trainable=False, sample=torch.randn(4, LENGTH))
    with pytest.raises(ValueError, match="unknown mode"):
        ClusterReader(9, LENGTH, "sum", d=8, dv=8, hidden=16, max_shift=4)


def test_the_residual_conv_starts_as_the_identity_and_the_spec_keeps_the_options() -> None:
    reader = _ranker(context=5).reader
    diff = torch.randn(3, LENGTH, 8)
    with torch.no_grad():
        assert torch.allclose(reader.whiten(diff.transpose(1, 2)).transpose(1, 2), diff)
    encoder = BiEncoderSpec(input_dim=LENGTH, channels=(8, 8), hidden=16, embed_dim=8).to_dict()
    spec = ReaderSpec(encoder=encoder, context=5, nearest=True)
    assert ReaderSpec.from_dict(spec.to_dict()) == spec
    assert ReaderSpec.from_dict({"encoder": encoder}).context == 0  # a reader stored before the options
    with pytest.raises(ValueError, match="odd"):
        ReaderSpec(encoder=encoder, context=4)
    ranker = build_ranker(spec, torch.randn(8, LENGTH))
    assert ranker.reader.context == 5 and ranker.reader.nearest and ranker.reader.mlp[0].in_features == 8 * spec.dv + 1


def test_members_read_at_several_points_a_sample_are_interpolated_and_served_as_trained() -> None:
    """`upsample`: the cached keys and values hold the plain ones at whole samples and their linear interpolation
    between, the alignment may move by a fraction of a sample, and a query scored from the cached item table (as
    served) gets the keys training computes."""
    ranker = _ranker(shift=True, upsample=3)
    reader = ranker.reader
    torch.nn.init.normal_(reader.mlp[-1].weight)
    fm = torch.randn(2, 4, LENGTH, 9)
    k, v = reader.item_side(fm)
    plain_k, plain_v = reader.k(fm), reader.v(fm)
    assert k.shape == (2, 4, 3 * (LENGTH - 1) + 1, 8) and v.shape[2] == k.shape[2]
    assert torch.allclose(k[:, :, ::3], plain_k, atol=1e-6) and torch.allclose(v[:, :, ::3], plain_v, atol=1e-6)
    assert torch.allclose(k[:, :, 1::3], plain_k[:, :, :-1] + (plain_k[:, :, 1:] - plain_k[:, :, :-1]) / 3, atol=1e-5)
    gen = torch.Generator().manual_seed(5)
    q, members, rs = _groups(torch.randn(20, LENGTH, generator=gen), 1, 6, 4, gen)
    with torch.no_grad():
        want = ranker.scores(q, members, rs)[0]
        table = ranker.item_table(members[0].reshape(-1, LENGTH)).reshape(6, 4, -1)
        got = ranker.query_keys(q, table, rs[0])
    assert torch.allclose(got, want, atol=1e-4)
    assert len(set(want.tolist())) == 6  # a reader with an opinion: the check could fail


def test_the_lab_options_are_kept_by_the_spec_and_refused_when_they_make_no_sense() -> None:
    encoder = BiEncoderSpec(input_dim=LENGTH, channels=(8, 8), hidden=16, embed_dim=8).to_dict()
    spec = ReaderSpec(encoder=encoder, shift=True, upsample=2, context=0)
    assert ReaderSpec.from_dict(spec.to_dict()) == spec
    old = ReaderSpec.from_dict({"encoder": encoder})  # a reader stored before the options
    assert not old.shift and old.upsample == 1
    with pytest.raises(ValueError, match="upsample"):
        ReaderSpec(encoder=encoder, upsample=0)
    with pytest.raises(ValueError, match="unknown cluster reader spec keys"):
        ReaderSpec.from_dict({"encoder": encoder, "stride": 2})
    ranker = build_ranker(spec, torch.randn(8, LENGTH))
    assert ranker.reader.shift and ranker.reader.item_length == 2 * (LENGTH - 1) + 1
    assert ranker.reader.mlp[0].in_features == 5 * spec.dv + 1 + 3


def test_a_spec_stored_before_the_served_shape_changed_keeps_the_shape_its_weights_have() -> None:
    """The served widths changed once; a stored spec that lacks them was written against the first ones, and must
    build a reader its weights fit, while a spec written now round-trips with the served shape."""
    encoder = BiEncoderSpec(input_dim=LENGTH, channels=(8, 8), hidden=16, embed_dim=8).to_dict()
    served = ReaderSpec(encoder=encoder)
    assert {k: getattr(served, k) for k in FIRST_SERVED_SHAPE} != FIRST_SERVED_SHAPE
    assert ReaderSpec.from_dict(served.to_dict()) == served
    first = ReaderSpec(encoder=encoder, **FIRST_SERVED_SHAPE)
    stored = {k: v for k, v in first.to_dict().items() if k not in FIRST_SERVED_SHAPE}  # as written back then
    assert ReaderSpec.from_dict(stored) == first
    weights = build_ranker(first, torch.randn(8, LENGTH)).state_dict()
    build_ranker(ReaderSpec.from_dict(stored), torch.randn(8, LENGTH)).load_state_dict(weights)  # strict: fits
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_ranker(served, torch.randn(8, LENGTH)).load_state_dict(weights)
