"""CPU time of one batched model call (`models.inference.score_many`) and its parts, per query (not a test).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_score_many --home /work/homes/h2c \
        --calls pair-s10:200,pair-dense:180 --batch 1,8,16

For each `variant:rows` (the rows a query scores in that stage: the default cascade's stage 1 scores 200 clusters
x 1 member with `pair-s10`, stage 2 60 x 3 with `pair-dense`) and each batch size Q: Q held-out queries prepared
for that many rows, each against its own `rows` random items' cached inputs, then `score_many` over all of them,
repeated; the process CPU time per query (median of 5 blocks) of preparing the queries (`prepare_many`: their
trunk, retriever embedding and fold), of the whole scoring call, and of the per-query first layers alone (the
folded products, one per query, which no batch can share). Run it with another checkout first on PYTHONPATH
to compare two versions.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import load_snapshot_from, median, set_threads

__all__ = ["main"]


def _cpu_ms(fn, repeat: int) -> float:
    fn()
    blocks = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(repeat):
            fn()
        blocks.append((time.process_time() - t0) / repeat * 1000.0)
    return median(blocks)


def _first_layers(prepared: list, items: list[torch.Tensor], context: int) -> None:
    """Each query's folded first layer over its own rows (what `score_prepared_many` runs per query)."""
    for pr, x in zip(prepared, items, strict=True):
        f = getattr(pr, "prepared", pr)
        if hasattr(f, "stacked"):
            torch.addmm(f.bias, x[:, : x.shape[1] - context] if context else x, f.stacked)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--space", default="default")
    p.add_argument("--calls", default="pair-s10:200,pair-dense:180")
    p.add_argument("--batch", default="1,8,16")
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    set_threads(1)
    from models.inference import score_many
    from models.scorer import prepare_many

    snapshot = load_snapshot_from(args.home, args.space)
    n_items = snapshot.space.num_items
    print(
        "| variant | rows per query | queries per call | CPU ms per query: prepare_many | score_many | "
        "of which first layers |"
    )
    print("|---|---|---|---|---|---|")
    for call in args.calls.split(","):
        name, rows = call.split(":")
        variant = snapshot.variants[name]
        model = variant.model
        context = getattr(model, "_context_width", 0)
        for q in [int(b) for b in args.batch.split(",")]:
            gen = torch.Generator().manual_seed(0)
            queries = [torch.from_numpy(snapshot.queries.x[i : i + 1]) for i in range(q)]
            with torch.inference_mode():
                items = [
                    snapshot.item_inputs(variant, torch.randint(0, n_items, (int(rows),), generator=gen))
                    for _ in range(q)
                ]
                prepared = prepare_many(model, queries, [int(rows)] * q)
                prep = (
                    _cpu_ms(lambda m=model, qs=queries, n=int(rows), k=q: prepare_many(m, qs, [n] * k), args.repeat) / q
                )
                whole = _cpu_ms(lambda m=model, p=prepared, x=items: score_many(m, p, x), args.repeat) / q
                first = _cpu_ms(lambda p=prepared, x=items, c=context: _first_layers(p, x, c), args.repeat) / q
            print(f"| {name} | {rows} | {q} | {prep:.3f} | {whole:.3f} | {first:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
