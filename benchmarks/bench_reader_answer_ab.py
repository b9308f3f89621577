"""The cluster reader's answer, this tree's `cascade/reader.py` against another tree's, timed in one process with the
two interleaved round by round (not a test): a change to the reader's stage that saves a fraction of a millisecond
is judged against the noise of the reader's own call, not against a run at another time.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_reader_answer_ab --home H --other TREE

Only `cascade/reader.py` is taken from TREE (loaded as a separate module over this tree's snapshot, models and
helpers), so the other tree must differ from this one there alone. Each round answers the space's first `--queries`
held-out queries by example as the service does (FAISS's 200 candidates, k = 10, seed = the query's position, this
tree passing the plan's FLOPs count where its `reader_answer` takes one); the figure per round is the median over
its queries, and the rounds alternate which tree goes first. Both trees' answers are compared too: their cluster
ids, scores and posteriors must be equal.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import time
from pathlib import Path

import numpy as np

from benchmarks.common import load_snapshot_from, median, set_threads

__all__ = ["main"]


def _other_reader(tree: Path):
    spec = importlib.util.spec_from_file_location("other_tree_reader", tree / "cascade" / "reader.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"{tree} has no cascade/reader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--space", default="default")
    p.add_argument("--other", type=Path, required=True, help="the other tree (its cascade/reader.py)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    set_threads(1)

    from cascade import reader as this
    from cascade.plan import plan_reader, target_from_examples

    other = _other_reader(args.other)
    snap = load_snapshot_from(args.home, args.space)
    assert snap.reader is not None, "the space has no cluster reader stored beside it"
    snap.warm()
    qs = snap.queries
    assert qs is not None, "the space ships no held-out queries"
    targets = [target_from_examples(snap, qs.x[i : i + 1], 200) for i in range(min(args.queries, len(qs)))]
    counts = [plan_reader(snap, t, 10).stage_flops[0] for t in targets]

    takes_count = {m: "flops" in inspect.signature(m.reader_answer).parameters for m in (this, other)}

    def answer(module, i: int):
        extra = {"flops": counts[i]} if takes_count[module] else {}
        return module.reader_answer(snap, targets[i], 10, i, **extra)

    for i in range(len(targets)):  # warm both, and check they answer alike
        a, b = answer(this, i), answer(other, i)
        same = (
            np.array_equal(a.cluster_ids, b.cluster_ids)
            and np.array_equal(a.scores, b.scores)
            and np.array_equal(a.posteriors, b.posteriors)
        )
        if not same:
            raise SystemExit(f"query {i}: the two trees answer differently")

    def one_round(module) -> float:
        times = []
        for i in range(len(targets)):
            t0 = time.perf_counter()
            answer(module, i)
            times.append((time.perf_counter() - t0) * 1000.0)
        return median(times)

    rounds: dict[str, list[float]] = {"this tree": [], "other tree": []}
    for r in range(args.rounds):
        order = [("this tree", this), ("other tree", other)]
        for name, module in order if r % 2 == 0 else order[::-1]:
            rounds[name].append(one_round(module))
    print(f"{len(targets)} queries, answers equal; median ms per answer, round by round:")
    for name, values in rounds.items():
        print(f"{name}: " + ", ".join(f"{v:.3f}" for v in values) + f"; median {median(values):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
