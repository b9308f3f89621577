"""The cluster reader's dev check: it answers queries by example by default only where it beats both FAISS alone and
the default pair cascade on the space's dev queries (`cascade.queries.SPLIT_RULE`), measured side by side on the
same queries: it must never replace a better default. "Beats" is a test, not only a comparison of means: against
each method, neither its recall@1 nor its nDCG@10 may be lower, and on one of the two the queries it answers better
must outnumber those it answers worse by more than chance allows at the check's confidence (a one-sided sign test
per metric, the confidence split over the two). A reader that serves costs about 40 times FAISS's FLOPs, so a gain
inside the dev queries' noise does not put it in front of every query. The check is stored
in the home's cascade.json (`CascadeConfig.reader`), with the sha256 of the reader it measured, so that a reader
stored later is not served until it is measured too.

Its answers rank by expected gain, which weighs the reader's own-cluster posterior against the label's, so the
posterior's temperature matters (one number, fitted by the negative log-likelihood of each query's own cluster among
those read; `models.calibration`): a reader trained on a few thousand clusters can be far surer of itself than its
accuracy on new queries. The temperature is cross-fitted: each half of the dev queries (by position) is answered at
the temperature fitted on the other half, so no reported answer used its own query to tune; the reader is then
served at the temperature fitted on all of them."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from cascade.config import READER_CONFIDENCE, READER_POOL, READER_RULE, ReaderChoice
from cascade.evaluation import example_queries, graded_metrics
from cascade.plan import plan_reader
from cascade.queries import cluster_grades
from cascade.reader import per_metric_level, reader_keys, rerank_width, sure_win
from cascade.side_by_side import HeldOutQuery, Method, Round, side_by_side, stages
from cascade.snapshot import Snapshot
from models.calibration import calibration_report, fit_temperature

__all__ = [
    "DEV_COLUMNS",
    "check_reader",
    "cross_fitted_temperatures",
    "fit_reader_temperature",
    "measure_reader",
    "sign_test",
]

DEV_COLUMNS = ("recall_at_1", "recall_at_k", "ndcg_at_k", "flops", "ms")
"""The columns of `measure_reader`'s per-query rows."""


def _duel(reader: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """The queries the reader answers better and worse than another method by one metric, and the sign test's
    p-value of that split."""
    wins, losses = int((reader > other).sum()), int((reader < other).sum())
    return {"wins": wins, "losses": losses, "p_value": float(f"{sign_test(wins, losses):.3g}")}


def sign_test(wins: int, losses: int) -> float:
    """One-sided p-value of `wins` against `losses` under a fair coin: the chance of at least this many wins among
    the queries where the two differ (the exact McNemar test). 1.0 where they never differ: no evidence."""
    n = wins + losses
    if n == 0:
        return 1.0
    return math.fsum(math.comb(n, i) for i in range(wins, n + 1)) / 2.0**n


def _own_cluster_keys(snapshot: Snapshot, held_out: list[HeldOutQuery], k: int) -> list[tuple[int, torch.Tensor, int]]:
    """(position, reader keys, the own cluster's column) of each query whose own cluster is among those the reader
    reads (the others say nothing about which read cluster is theirs). Query i reads with seed i."""
    rows = []
    for i, query in enumerate(held_out):
        target = query.target(snapshot)
        assert target.candidates is not None
        width = rerank_width(snapshot, target, k)
        own = np.flatnonzero(target.candidates[:width] == query.info["cluster"])
        if len(own):
            keys = reader_keys(snapshot, target, width, seed=i)
            rows.append((i, keys, int(own[0])))
    return rows


def _fit(rows: list[tuple[int, torch.Tensor, int]], where: str = "") -> dict[str, float]:
    if len({r[1].shape[1] for r in rows}) > 1 or sum(len(r[1]) for r in rows) < 2:
        raise ValueError(
            f"the temperature needs at least 2 dev queries whose own cluster is read{where}, all at one width"
        )
    keys = torch.cat([r[1] for r in rows])
    grades = torch.tensor([own for _, key, own in rows for _ in range(len(key))])
    return calibration_report(keys, grades, fit_temperature(keys, grades))


def fit_reader_temperature(snapshot: Snapshot, held_out: list[HeldOutQuery], k: int) -> dict[str, float]:
    """The temperature of the reader's own-cluster posterior fitted on `held_out` queries, with the calibration
    report of `models.calibration` (its "pairs" are queries here)."""
    return _fit(_own_cluster_keys(snapshot, held_out, k))


def cross_fitted_temperatures(
    snapshot: Snapshot, held_out: list[HeldOutQuery], k: int
) -> tuple[dict[str, float], tuple[float, float]]:
    """The calibration on all `held_out` queries (the temperature served), and the temperatures fitted on the odd
    and on the even positions: the even positions are measured at the first, the odd at the second."""
    rows = _own_cluster_keys(snapshot, held_out, k)
    half = " in each half of them (the temperature is cross-fitted)"
    on_odd = _fit([r for r in rows if r[0] % 2 == 1], half)["temperature"]
    on_even = _fit([r for r in rows if r[0] % 2 == 0], half)["temperature"]
    return _fit(rows), (on_odd, on_even)


def check_reader(snapshot: Snapshot, *args: Any, **kwargs: Any) -> ReaderChoice:
    """`measure_reader`'s verdict alone (the same arguments)."""
    return measure_reader(snapshot, *args, **kwargs)[0]


def measure_reader(
    snapshot: Snapshot,
    candidates: int = 10,
    members: int = 10,
    queries: int | None = None,
    k: int = 10,
    stage0: int | None = None,
    pool: int | None = None,
    confidence: float = READER_CONFIDENCE,
) -> tuple[ReaderChoice, dict[str, np.ndarray]]:
    """FAISS alone, the default pair cascade (where it is not FAISS alone) and the reader's answer (reading up to
    `members` members of FAISS's top `candidates`, ranking its top `pool`, default `READER_POOL`) on the first
    `queries` dev queries (None: all), each half at the reader's temperature fitted on the other. Served where,
    against each of the others, neither its mean recall@1 nor its mean nDCG@10 is lower, and on one of the two the
    sign test of the queries it wins and loses gives p <= (1 - `confidence`) / 2. `stage0`: how many clusters FAISS
    proposes (default: the space's `pair_candidates`, else 200). Returns the verdict and the per-query rows behind
    it (`DEV_COLUMNS` per method, and each query's own cluster), which a comparison of two readers pairs up."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"the check's confidence must be in [0.5, 1), not {confidence}")
    if snapshot.reader is None:
        raise ValueError("the space has no cluster reader to check")
    pool = READER_POOL if pool is None else pool
    choice = ReaderChoice(
        served=False,
        sha256=snapshot.reader.sha256,
        space=str(snapshot.space.meta.get("id", "")),
        candidates=candidates,
        members=members,
        pool=pool,
        rule=READER_RULE,
        confidence=confidence,
    )
    measured = replace(snapshot, config=snapshot.config.model_copy(update={"reader": choice}))
    held_out = example_queries(measured, max(stage0 or snapshot.config.pair_candidates or 200, k, pool), queries, "dev")
    if len(held_out) < 4:
        raise ValueError(f"the space has {len(held_out)} dev queries; the check needs at least 4 (2 a half)")
    calibration, folds = cross_fitted_temperatures(measured, held_out, k)
    methods = [stages("faiss", []), Method("reader", plan=lambda snap, target, kk: plan_reader(snap, target, kk))]
    if snapshot.config.pair_stages:  # the default it would replace (its own verdict above keeps it out of it)
        methods.append(stages("cascade", None))
    by_position: dict[int, Round] = {}
    for parity, temperature in ((0, folds[0]), (1, folds[1])):
        at = choice.model_copy(update={"temperature": temperature})
        half = replace(snapshot, config=snapshot.config.model_copy(update={"reader": at}))
        positions = range(parity, len(held_out), 2)
        answered = side_by_side(half, held_out[parity::2], methods, k, (0,), reference=None, seed_per_query=True)
        by_position.update(zip(positions, answered, strict=True))
    rounds = [by_position[i] for i in range(len(held_out))]
    choice = choice.model_copy(update={"temperature": calibration["temperature"]})
    rows: dict[str, list[tuple[float, ...]]] = {m.name: [] for m in methods}
    labels = snapshot.space.cluster_labels
    for r in rounds:
        grades = cluster_grades(labels, r.query.info["cluster"], r.query.info["label"], len(r.target.utility))
        for name in rows:
            rec = r[name]
            rows[name].append((*graded_metrics(rec.cluster_ids, grades, r.target.utility, k), rec.flops, rec.ms))
    table = {name: np.asarray(v, dtype=np.float64) for name, v in rows.items()}
    own = np.asarray([r.query.info["cluster"] for r in rounds], dtype=np.int64)
    summary = {
        name: {
            "recall_at_1": round(float(t[:, 0].mean()), 4),
            f"recall_at_{k}": round(float(t[:, 1].mean()), 4),
            f"ndcg_at_{k}": round(float(t[:, 2].mean()), 4),
            "flops": round(float(t[:, 3].mean())),
            "ms_median": round(float(np.median(t[:, 4])), 3),
        }
        for name, t in table.items()
    }
    diff = table["reader"][:, 0] - table["faiss"][:, 0]
    gain, se = float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))
    b = summary["reader"]
    others = [name for name in summary if name != "reader"]
    columns = {"recall_at_1": 0, f"ndcg_at_{k}": 2}  # the columns of `table` the check tests
    shown = {"recall_at_1": "recall@1", f"ndcg_at_{k}": f"nDCG@{k}"}
    duels = {o: {m: _duel(table["reader"][:, c], table[o][:, c]) for m, c in columns.items()} for o in others}
    alpha = per_metric_level(confidence, len(columns))  # either metric may carry the win

    def beats(o: str) -> bool:
        return all(b[m] >= summary[o][m] for m in columns) and sure_win(duels[o], confidence)

    served = all(beats(o) for o in others)
    verdict = "served by default" if served else "not served: queries by example go to the default pair cascade"
    names = {"faiss": "FAISS alone", "cascade": "the default pair cascade"}
    against = "; ".join(
        f"{names[o]} {summary[o]['recall_at_1']:.3f} and {summary[o][f'ndcg_at_{k}']:.3f} (queries the reader "
        + ", ".join(
            f"wins / loses by {shown[m]}: {d['wins']} / {d['losses']}, sign test p = {d['p_value']:.2g}"
            for m, d in duels[o].items()
        )
        + ")"
        for o in others
    )
    reason = (
        f"on {len(rounds)} dev queries the reader (reading FAISS top {candidates}, ranking top {pool} by expected "
        f"gain; the even positions at temperature {folds[0]:.3g}, fitted on the odd, the odd at {folds[1]:.3g}, "
        f"fitted on the even; served at {choice.temperature:.3g}, fitted on all) has recall@1 "
        f"{b['recall_at_1']:.3f} and nDCG@{k} {b[f'ndcg_at_{k}']:.3f} (recall@1 over FAISS alone {gain:+.3f}, "
        f"paired s.e. {se:.3f}); {against}. Served where neither mean is lower than any other's and against each "
        f"one of the two wins with p <= {alpha:.2g} (confidence {confidence:g}, split over the two): {verdict}"
    )
    dev = {
        "queries": len(rounds),
        **summary,
        "recall_at_1_gain": round(gain, 4),
        "recall_at_1_gain_se": round(se, 4),
        "wins_losses": duels,
        "alpha_per_metric": alpha,
        "calibration": calibration,
        "temperature_fitted_on_odd_even": list(folds),
    }
    per_query = {**table, "query_cluster": own}
    return choice.model_copy(update={"served": served, "reason": reason, "dev": dev}), per_query
