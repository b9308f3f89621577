"""The cluster reader's per-pair forward against its textbook formula, side by side in one run (not a test): the same
(query, FAISS top 10) pairs of a home's dev queries (each cluster read through its first n members, n the
smallest of the ten clusters' sizes), scored by `ClusterReader.forward` and by the formula it
computes written with torch's own logsumexp, softmax and var (the code before the forward was made faster),
interleaved per query. Prints the milliseconds per query of each, their ratio, the largest difference of the
scores and whether every query's order of its clusters is the same.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_reader_forward --home H [--profile]

With `--batch B`, it also measures what batching reader queries across requests would buy at the model call: the
forward over B queries' pairs in one call against the same B queries one call each, interleaved, and whether the
batched scores equal the one-by-one scores bit for bit (a batched answer must be the one a query gets alone).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import load_snapshot_from, set_threads


def textbook(reader, qq: torch.Tensor, qv: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`ClusterReader.forward`'s formula, one torch call per quantity (xattn mode)."""
    logits = torch.einsum("pqd,pnld->pnql", qq, k) + reader.rel[reader.rel_idx] + reader.rel_mask
    lse = torch.logsumexp(logits, -1)
    aligned = torch.einsum("pnql,pnlv->pnqv", logits.softmax(-1), v)
    m = aligned.mean(1)
    diff = qv - m
    feats = torch.cat([qv, m, diff, diff.pow(2), aligned.var(1, unbiased=False), lse.mean(1)[..., None]], -1)
    return reader.mlp(feats).squeeze(-1).sum(-1)


def batched_vs_alone(reader, pairs: list, alone: list[torch.Tensor], batch: int, rounds: int) -> None:
    """Prints the forward's milliseconds per query with `batch` queries' pairs in one call against one call per
    query (interleaved per batch), and whether the scores are the same bit for bit."""
    groups = [pairs[i : i + batch] for i in range(0, len(pairs) - batch + 1, batch)]
    joined = [tuple(torch.cat(parts) for parts in zip(*group, strict=True)) for group in groups]
    spent = {"one call per query": 0.0, f"{batch} queries per call": 0.0}
    for _ in range(rounds):
        for group, args in zip(groups, joined, strict=True):
            t = time.perf_counter()
            for a in group:
                reader(*a)
            spent["one call per query"] += time.perf_counter() - t
            t = time.perf_counter()
            reader(*args)
            spent[f"{batch} queries per call"] += time.perf_counter() - t
    together = torch.cat([reader(*args) for args in joined])
    one_by_one = torch.cat(alone[: len(groups) * batch])
    queries = len(groups) * batch * rounds
    ms = {name: s / queries * 1000 for name, s in spent.items()}
    (a, b) = ms.values()
    print(
        f"{len(groups) * batch} dev queries in batches of {batch}: one call per query {a:.3f} ms per query, "
        f"{batch} per call {b:.3f} ms: {a / b:.2f}x; bit for bit the same scores: {torch.equal(together, one_by_one)} "
        f"(largest difference {float((together - one_by_one).abs().max()):.2e})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--space", default="default")
    p.add_argument("--queries", type=int, default=100, help="the first N dev queries")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also print torch's profile of each, by self CPU time")
    p.add_argument("--batch", type=int, default=0, help="also time B queries in one forward against one by one")
    args = p.parse_args(argv)
    set_threads(1)
    from cascade.evaluation import example_queries

    snapshot = load_snapshot_from(args.home, args.space)
    if snapshot.reader is None or snapshot.reader.spec.mode != "xattn":
        raise SystemExit(f"{args.home} holds no cross-attention cluster reader beside its space {args.space!r}")
    ranker, table, offsets = snapshot.reader.ranker, snapshot.reader_inputs().table, snapshot.space.offsets
    reader = ranker.reader
    pairs = []
    with torch.inference_mode():
        for query in example_queries(snapshot, 10, args.queries, "dev"):
            target = query.target(snapshot)
            clusters = target.candidates[:10]
            n = int(np.diff(offsets)[clusters].min())  # one (G, n) block per query: each cluster's first n members
            rows = np.concatenate([np.arange(offsets[c], offsets[c] + n) for c in clusters])
            kv = table[torch.from_numpy(rows)].float().reshape(len(clusters), n, reader.length, -1)
            qq, qv = reader.query_side(ranker.trunk(target.queries[0]))
            g = len(clusters)
            pairs.append((qq.expand(g, -1, -1), qv.expand(g, -1, -1), kv[..., : reader.d], kv[..., reader.d :]))
        fast = [reader(*a) for a in pairs]
        slow = [textbook(reader, *a) for a in pairs]
        spent = {"forward": 0.0, "textbook": 0.0}
        for _ in range(args.rounds):
            for a in pairs:  # interleaved, so that the machine's noise hits both alike
                for name, fn in (("forward", reader), ("textbook", lambda *x: textbook(reader, *x))):
                    t = time.perf_counter()
                    fn(*a)
                    spent[name] += time.perf_counter() - t
        if args.profile:  # where each spends its time (the reason the forward is written as it is)
            from torch.profiler import ProfilerActivity, profile

            for name, fn in (("forward", reader), ("textbook", lambda *x: textbook(reader, *x))):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for a in pairs:
                        fn(*a)
                print(f"{name}:\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=8)}")
        if args.batch > 1:
            batched_vs_alone(reader, pairs, fast, args.batch, args.rounds)
    per_query = {name: s / args.rounds / len(pairs) * 1000 for name, s in spent.items()}
    largest = max(float((a - b).abs().max()) for a, b in zip(fast, slow, strict=True))
    same = all(
        torch.equal(torch.argsort(a, stable=True), torch.argsort(b, stable=True))
        for a, b in zip(fast, slow, strict=True)
    )
    print(f"{len(pairs)} dev queries x FAISS top 10, {args.rounds} rounds, one thread")
    print(
        f"forward {per_query['forward']:.3f} ms per query, textbook {per_query['textbook']:.3f} ms: "
        f"{per_query['textbook'] / per_query['forward']:.2f}x; largest score difference {largest:.2e}; "
        f"same order for every query: {same}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
