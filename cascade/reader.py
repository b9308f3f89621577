"""The cluster reader as the last stage of a query by example: FAISS proposes clusters, the reader reads the
members of its top `candidates` together with the query, and FAISS's top `pool` are ranked by their expected gain
under the query's gains over relevance grades (`models.cluster_reader`).

The reader is trained to say which cluster is the query's own: a softmax of its keys over the clusters it read is
that posterior (at the temperature its dev check fitted). The query's label posterior follows from it (the mass on
the read clusters of each label), and with both, every cluster of the pool has a posterior over the grades (own
cluster, same label, other), as a pair cascade's answer does. So a user's gains are honoured, and clusters the reader
did not read still rank by their label: the same-label clusters that nDCG rewards are found past the reader's width.

It answers by default only where the dev check (`cascade.reader_gate`) found it better than FAISS alone, for the
very reader now stored (`serves`). What a reader computes from an item alone (its keys and values at every
position) is computed once per item and cached in the snapshot's item cache, like a pair model's trunk features;
what runs per query is the query side and the reader over (query, cluster) pairs, counted by `planned_flops`."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from cascade.config import READER_CANDIDATES, READER_MEMBERS, READER_POOL, READER_RULE, ReaderChoice
from cascade.engine import CascadeResult, DeadlineExceeded, StageReport
from cascade.snapshot import Snapshot
from cascade.space import sample_members
from cascade.target import Target, ranking_key

__all__ = [
    "check_of",
    "serves",
    "at_confidence",
    "sure_win",
    "per_metric_level",
    "rerank_width",
    "pool_width",
    "planned_flops",
    "reader_keys",
    "grade_log_posteriors",
    "reader_answer",
    "READER_STAGE",
]

READER_STAGE = "cluster-reader"
"""The stage's name in a query's report (the reader is stored beside the space, not in the model registry)."""
LOG_FLOOR = math.log(torch.finfo(torch.float64).tiny)
"""The least log posterior an answer carries: a grade nothing supports (the own grade of a cluster not read) is this,
not minus infinity, so that ranking values stay finite numbers in JSON."""


def check_of(snapshot: Snapshot) -> ReaderChoice | None:
    """The dev check that applies to the snapshot's reader: one of that same reader on this same space, or None
    (no reader, never checked, a check of another reader or space, or one of another ranking rule)."""
    choice, stored = snapshot.config.reader, snapshot.reader
    if stored is None or choice is None or choice.rule != READER_RULE:
        return None
    if choice.sha256 != stored.sha256 or choice.space != str(snapshot.space.meta.get("id", "")):
        return None
    return choice


def per_metric_level(confidence: float, metrics: int) -> float:
    """The p-value one sign test must reach when any of `metrics` may carry the win (Bonferroni over them)."""
    return (1.0 - confidence) / metrics


def sure_win(duels: dict[str, dict[str, float]], confidence: float) -> bool:
    """Whether the reader's sign tests against one method, a p-value per metric (`cascade.reader_gate`), make a win
    sure at `confidence`: one of them at most `per_metric_level` (either may carry it)."""
    return min(d["p_value"] for d in duels.values()) <= per_metric_level(confidence, len(duels))


def at_confidence(choice: ReaderChoice, confidence: float) -> tuple[ReaderChoice, str | None]:
    """A recorded dev check as it stands where the service asks for `confidence` (`PRUNECASCADE_READER_CONFIDENCE`),
    and what an answer should say about it. A check that served its reader at a lower confidence is judged again
    from the sign tests it recorded (p-values kept to three significant figures), and unserved where they fall
    short; one recorded before the sign tests (means only) cannot be judged again, so it serves on, with a warning
    that `prunecascade reader --check` would judge it. A lower setting than the check's takes effect at the next
    check: a reader the check refused stays refused."""
    if not choice.served or confidence <= choice.confidence:
        return choice, None
    duels = choice.dev.get("wins_losses")
    if not isinstance(duels, dict) or not duels:
        return choice, (
            f"the cluster reader serves under a dev check at confidence {choice.confidence:g}, which recorded no sign "
            f"tests, below this service's {confidence:g}: `prunecascade reader --check` checks it at {confidence:g}"
        )
    short = [o for o, d in duels.items() if not sure_win(d, confidence)]
    if not short:
        return choice, None
    level = per_metric_level(confidence, len(duels[short[0]]))
    why = (
        f"not served at this service's confidence {confidence:g} (its dev check served it at {choice.confidence:g}; "
        f"against {', '.join(short)} no sign test reaches p <= {level:.2g})"
    )
    unserved = choice.model_copy(update={"served": False, "reason": f"{why}. {choice.reason}"[:2000]})
    return unserved, f"the cluster reader is {why}"


def serves(snapshot: Snapshot) -> bool:
    """Whether the reader answers this snapshot's queries by example by default: its dev check chose it over FAISS
    alone and the default pair cascade."""
    choice = check_of(snapshot)
    return choice is not None and choice.served and snapshot.embedding is not None


def rerank_width(snapshot: Snapshot, target: Target, k: int) -> int:
    """How many of FAISS's candidates the reader reads: the dev-checked number, at least k."""
    assert target.candidates is not None
    choice = snapshot.config.reader
    configured = choice.candidates if choice is not None else READER_CANDIDATES
    return min(len(target.candidates), max(k, configured))


def pool_width(snapshot: Snapshot, target: Target, k: int) -> int:
    """How many of FAISS's candidates the answer ranks: the dev-checked pool, at least what the reader reads."""
    assert target.candidates is not None
    choice = snapshot.config.reader
    configured = choice.pool if choice is not None else READER_POOL
    return min(len(target.candidates), max(rerank_width(snapshot, target, k), configured))


def _temperature(snapshot: Snapshot) -> float:
    return snapshot.config.reader.temperature if snapshot.config.reader is not None else 1.0


def _members(snapshot: Snapshot) -> int:
    return snapshot.config.reader.members if snapshot.config.reader is not None else READER_MEMBERS


def _read_counts(snapshot: Snapshot, clusters: np.ndarray) -> np.ndarray:
    """Members read of each cluster: all of a small one's, a sample of the dev-checked number of a larger one's."""
    return np.minimum(np.diff(snapshot.space.offsets)[clusters], _members(snapshot))


def planned_flops(snapshot: Snapshot, target: Target, k: int) -> int:
    """FLOPs of the reader's stage for this target: per example, its query side once and the reader on every
    (query, cluster) pair with as many members as each cluster will be read with."""
    assert snapshot.reader is not None and target.candidates is not None
    ranker = snapshot.reader.ranker
    clusters = target.candidates[: rerank_width(snapshot, target, k)]
    counts, clusters_read = np.unique(_read_counts(snapshot, clusters), return_counts=True)
    pairs = sum(ranker.reader.flops_per_pair(int(n)) * int(c) for n, c in zip(counts, clusters_read, strict=True))
    return len(target.queries) * (ranker.query_flops() + pairs)


def reader_keys(snapshot: Snapshot, target: Target, width: int, seed: int = 0) -> torch.Tensor:
    """The reader's keys of FAISS's first `width` candidates, one row per example of the query (E, width). Clusters
    with more members than the dev-checked number are read through a uniform sample of them (`seed`); smaller ones
    are read whole."""
    assert snapshot.reader is not None and snapshot.embedding is not None and target.candidates is not None
    ranker = snapshot.reader.ranker
    clusters = target.candidates[:width]
    rows, counts = sample_members(snapshot.space.offsets, clusters, _members(snapshot), np.random.default_rng(seed))
    table = snapshot.reader_inputs().table
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    centroids = torch.from_numpy(snapshot.embedding.index.centroids(clusters).astype(np.float32))
    keys = torch.zeros(len(target.queries), len(clusters), dtype=torch.float64)
    with torch.inference_mode():
        for e, q in enumerate(target.queries):
            assert q is not None
            if target.embeddings is not None:  # stage 0's own embedding of this example
                embedded = torch.from_numpy(target.embeddings[e : e + 1])
            else:
                embedded = snapshot.embedding.encoder.embed(q)  # type: ignore[operator]
            retriever_score = -((centroids - embedded) ** 2).sum(1)  # minus the squared distance FAISS ranks by
            for n in np.unique(counts):  # clusters read with the same number of members go in one call
                which = np.flatnonzero(counts == n)
                picked = torch.from_numpy(starts[which][:, None] + np.arange(n)).reshape(-1)
                items = torch.index_select(table, 0, torch.from_numpy(rows)[picked]).float()
                keys[e, which] = ranker.query_keys(
                    q, items.reshape(len(which), int(n), -1), retriever_score[which]
                ).double()
    return keys


def grade_log_posteriors(
    log_own: torch.Tensor, read_labels: np.ndarray, pool_labels: np.ndarray, grades: int
) -> torch.Tensor:
    """log p(grade | query, cluster) for every cluster of a pool (P, grades), from the log posterior of which of the
    W clusters read is the query's own (E, W) over examples; the pool's first W clusters are the read ones. The own
    cluster is taken to be among those read, so the label posterior is the mass on the read clusters of each label:
    p(same label, not own | c) sums the other read clusters of c's label, p(other | c) those of other labels. With 2
    grades (no instance structure) the own cluster is graded as its label. Averaged over examples, as a pair
    cascade averages its grade posteriors."""
    if grades not in (2, 3):
        raise ValueError(f"the reader's posterior has 2 or 3 relevance grades, not {grades}")
    width, pool = len(read_labels), len(pool_labels)
    same = read_labels[:, None] == pool_labels[None, :]  # (W, P)
    if grades == 3:  # per grade, the read clusters left out of its mass: other labels, same label, itself
        itself = np.eye(width, pool, dtype=bool)
        left_out = np.stack([same, ~same | itself, ~itself])
    else:
        left_out = np.stack([same, ~same])
    # every grade's mass in one log-sum-exp over the read clusters: (E, 1, W, 1) masked to (E, grades, W, P)
    lp = log_own.double()[:, None, :, None].masked_fill(torch.from_numpy(left_out), -math.inf)
    per_example = torch.logsumexp(lp, dim=2).transpose(1, 2)  # (E, P, grades)
    mean = torch.logsumexp(per_example, dim=0) - math.log(len(log_own))
    return mean.clamp_min(LOG_FLOOR)


def reader_answer(
    snapshot: Snapshot,
    target: Target,
    k: int,
    seed: int = 0,
    deadline: float | None = None,
    flops: int | None = None,
) -> CascadeResult:
    """The best k of FAISS's top `pool` clusters by expected gain under the reader's grade posteriors (ranked by its
    log-odds, `cascade.target.ranking_key`, as a cascade's answer is; ties, such as clusters of a label the reader
    gave no mass, keep FAISS's order). `flops`: the stage's `planned_flops`, where the plan counted them already."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the deadline passed before the reader ran")
    assert target.candidates is not None
    started = time.perf_counter()
    width, pool = rerank_width(snapshot, target, k), pool_width(snapshot, target, k)
    keys = reader_keys(snapshot, target, width, seed)
    log_own = torch.log_softmax(keys / _temperature(snapshot), dim=1)
    clusters = target.candidates[:pool]
    labels = snapshot.space.cluster_labels
    log_post = grade_log_posteriors(log_own, labels[clusters[:width]], labels[clusters], len(target.utility))
    values = ranking_key(log_post, target)
    order = torch.argsort(values, descending=True, stable=True)[:k].numpy()
    post = log_post[order].exp()
    flops = planned_flops(snapshot, target, k) if flops is None else flops
    read = _read_counts(snapshot, clusters[:width])
    report = StageReport(
        variant=READER_STAGE,
        version=1,
        aggregator="reader",
        clusters_in=width,
        kept=len(order),
        samples=int(read.max()) if len(read) else 0,
        items=int(read.sum()),
        flops=flops,
        flops_dense_kernel=flops,
        ms=(time.perf_counter() - started) * 1000.0,
    )
    return CascadeResult(
        cluster_ids=clusters[order],
        scores=(post @ torch.from_numpy(target.utility).double()).numpy(),
        posteriors=post.float().numpy(),
        stages=[report],
        snapshot_id=snapshot.id,
        ranking_values=values[order].numpy(),
    )
