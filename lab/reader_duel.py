"""Two readers query by query: which answers more dev queries right first, beyond chance. Each side is the
`--per-query` file of `prunecascade reader --check` on a home (the same space's dev queries, so the rows pair up);
pairs of files from several spaces are pooled. The sign test counts the queries exactly one of the two answers right
first (`cascade.reader_gate.sign_test`), as the dev check does against FAISS alone.

    PYTHONPATH=. python -m lab.reader_duel A_default.npz:B_default.npz A_fresh.npz:B_fresh.npz [--metric recall_at_1]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from cascade.reader_gate import sign_test


def load_pair(spec: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The reader's `metric` per query in two check files of the same dev queries."""
    a_path, sep, b_path = spec.partition(":")
    if not sep:
        raise SystemExit(f"a pair is A.npz:B.npz, not {spec!r}")
    a, b = np.load(a_path), np.load(b_path)
    if not np.array_equal(a["query_cluster"], b["query_cluster"]):
        raise SystemExit(f"{a_path} and {b_path} were not checked on the same dev queries")
    column = list(a["columns"]).index(metric)
    return a["reader"][:, column], b["reader"][:, column]


def duel(a: np.ndarray, b: np.ndarray) -> dict:
    """A against B: means, the paired difference and its standard error, queries won / lost, one-sided sign test."""
    diff = a - b
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    return {
        "queries": len(diff),
        "a": round(float(a.mean()), 4),
        "b": round(float(b.mean()), 4),
        "a_minus_b": round(float(diff.mean()), 4),
        "se": round(float(diff.std(ddof=1) / math.sqrt(len(diff))), 4) if len(diff) > 1 else None,
        "a_wins_losses": [wins, losses],
        "sign_test_p": float(f"{sign_test(wins, losses):.3g}"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="A.npz:B.npz")
    ap.add_argument("--metric", default="recall_at_1", help="a column of the files (default recall_at_1)")
    args = ap.parse_args()
    sides = [load_pair(spec, args.metric) for spec in args.pairs]
    out = {spec: duel(a, b) for spec, (a, b) in zip(args.pairs, sides, strict=True)}
    if len(sides) > 1:
        out["pooled"] = duel(np.concatenate([a for a, _ in sides]), np.concatenate([b for _, b in sides]))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
