"""The cluster reader as the last stage of a query by example: FAISS proposes clusters, the reader reads the
members of its top `candidates` together with the query and reorders them (`models.cluster_reader`).

It answers by default only where the dev check (`cascade.reader_gate`) found it better than FAISS alone, for the
very reader now stored (`serves`). What a reader computes from an item alone (its keys and values at every
position) is computed once per item and cached in the snapshot's item cache, like a pair model's trunk features;
what runs per query is the query side and the reader over (query, cluster) pairs, counted by `planned_flops`."""

from __future__ import annotations

import time

import numpy as np
import torch

from cascade.config import READER_CANDIDATES, READER_MEMBERS, ReaderChoice
from cascade.engine import CascadeResult, DeadlineExceeded, StageReport
from cascade.snapshot import Snapshot
from cascade.space import sample_members
from cascade.target import Target

__all__ = ["check_of", "serves", "rerank_width", "planned_flops", "reader_answer", "READER_STAGE", "RANKING"]

READER_STAGE = "cluster-reader"
"""The stage's name in a query's report (the reader is stored beside the space, not in the model registry)."""
RANKING = "reader_key"
"""What a reader's ranking values are: its key, the reader's score plus its multiple of the retriever's score."""


def check_of(snapshot: Snapshot) -> ReaderChoice | None:
    """The dev check that applies to the snapshot's reader: one of that same reader on this same space, or None
    (no reader, never checked, or a check of another reader or space)."""
    choice, stored = snapshot.config.reader, snapshot.reader
    if stored is None or choice is None:
        return None
    if choice.sha256 != stored.sha256 or choice.space != str(snapshot.space.meta.get("id", "")):
        return None
    return choice


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


def _members(snapshot: Snapshot) -> int:
    return snapshot.config.reader.members if snapshot.config.reader is not None else READER_MEMBERS


def planned_flops(snapshot: Snapshot, target: Target, k: int) -> int:
    """FLOPs of the reader's stage for this target: per example, its query side once and the reader on every
    (query, cluster) pair with as many members as each cluster will be read with."""
    assert snapshot.reader is not None and target.candidates is not None
    ranker = snapshot.reader.ranker
    clusters = target.candidates[: rerank_width(snapshot, target, k)]
    sizes = np.minimum(np.diff(snapshot.space.offsets)[clusters], _members(snapshot))
    per_example = ranker.query_flops() + sum(ranker.reader.flops_per_pair(int(n)) for n in sizes)
    return len(target.queries) * per_example


def reader_answer(
    snapshot: Snapshot,
    target: Target,
    k: int,
    seed: int = 0,
    deadline: float | None = None,
) -> CascadeResult:
    """The reader's rerank of FAISS's top candidates: the best k by the key, averaged over the query's examples.
    Clusters with more members than the dev-checked number are read through a uniform sample of them (`seed`);
    smaller ones are read whole."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the deadline passed before the reader ran")
    assert snapshot.reader is not None and snapshot.embedding is not None and target.candidates is not None
    started = time.perf_counter()
    ranker = snapshot.reader.ranker
    clusters = target.candidates[: rerank_width(snapshot, target, k)]
    rows, counts = sample_members(snapshot.space.offsets, clusters, _members(snapshot), np.random.default_rng(seed))
    table = snapshot.reader_inputs().table
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    centroids = torch.from_numpy(snapshot.embedding.index.centroids(clusters).astype(np.float32))
    keys = torch.zeros(len(clusters), dtype=torch.float64)
    with torch.inference_mode():
        for q in target.queries:
            assert q is not None
            e = snapshot.embedding.encoder.embed(q)  # type: ignore[operator]
            retriever_score = -((centroids - e) ** 2).sum(1)  # minus the squared distance FAISS ranks by
            for n in np.unique(counts):  # clusters read with the same number of members go in one call
                which = np.flatnonzero(counts == n)
                picked = torch.from_numpy(starts[which][:, None] + np.arange(n)).reshape(-1)
                items = torch.index_select(table, 0, torch.from_numpy(rows)[picked]).float()
                keys[which] += ranker.query_keys(
                    q, items.reshape(len(which), int(n), -1), retriever_score[which]
                ).double()
    keys /= len(target.queries)
    order = torch.argsort(keys, descending=True, stable=True)[:k].numpy()
    flops = planned_flops(snapshot, target, k)
    report = StageReport(
        variant=READER_STAGE,
        version=1,
        aggregator="reader",
        clusters_in=len(clusters),
        kept=len(order),
        samples=int(counts.max()) if len(counts) else 0,
        items=int(counts.sum()),
        flops=flops,
        flops_dense_kernel=flops,
        ms=(time.perf_counter() - started) * 1000.0,
    )
    values = keys[order].numpy()
    return CascadeResult(
        cluster_ids=clusters[order],
        scores=values,
        posteriors=np.zeros((len(order), 0), dtype=np.float32),
        stages=[report],
        snapshot_id=snapshot.id,
        ranking_values=values,
        ranking=RANKING,
    )
