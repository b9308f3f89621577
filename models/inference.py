"""Serving-time forward passes in cache-sized chunks.

The networks of the cascade ran up to 3.2x slower per item over one 20,000-item batch than over chunks of a few
thousand rows (docs/performance.md, section 4): once a layer's activations outgrow the core's L2 cache every
layer streams them from memory. The chunk is therefore sized from the network's widest activation, so the
cheap first stage gets large chunks and the dense model small ones.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from models.networks import Classifier
from models.scorer import Scorer, item_inputs, prepare_for
from models.spec import NetworkSpec

__all__ = [
    "ACTIVATION_BUDGET_BYTES",
    "MIN_CHUNK_ROWS",
    "widest_activation",
    "chunk_rows",
    "forward_chunked",
    "score_chunked",
    "score_many",
    "rows_at_least",
    "balanced_chunks",
    "MIN_GEMM_ROWS",
]

ACTIVATION_BUDGET_BYTES = 2 * 1024 * 1024  # the L2 cache of one core here; chosen by benchmarks/bench_compute.py
MIN_CHUNK_ROWS = 256


def widest_activation(spec: NetworkSpec) -> int:
    """Floats per item of the largest tensor a forward pass produces (the output of a conv before pooling)."""
    widths = [spec.input_dim, *spec.hidden, spec.num_classes]
    if spec.kind != "mlp":
        positions = spec.input_dim
        for channels in spec.channels:
            widths.append(channels * positions)
            positions //= 2 if spec.kind == "cnn1d" else 4
    return max(widths)


def chunk_rows(spec: NetworkSpec, budget_bytes: int = ACTIVATION_BUDGET_BYTES) -> int:
    """Rows per forward pass so that the widest activation of a chunk fits in `budget_bytes` of float32."""
    if budget_bytes <= 0:
        raise ValueError("budget_bytes must be positive")
    return max(MIN_CHUNK_ROWS, budget_bytes // (4 * widest_activation(spec)))


def forward_chunked(model: Classifier, x: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and hidden representations of every row of `x`, computed `chunk` rows at a time (default: sized
    by `chunk_rows` from the model's spec). Call it under `torch.inference_mode()`."""
    step = chunk or chunk_rows(model.spec)
    if len(x) <= step:
        return model.forward_with_hidden(x)
    parts = [model.forward_with_hidden(x[i : i + step]) for i in range(0, len(x), step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def score_chunked(
    model: Scorer,
    query: torch.Tensor | None,
    items: torch.Tensor,
    chunk: int | None = None,
    *,
    inputs: bool = False,
    prepared: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.score(query, items)` over `items` in chunks: the one call the cascade makes, whatever the kind of
    model (a classifier ignores the query; a pair model reads it with every item). `items` are raw features,
    or with `inputs=True` already the model's item inputs (`models.scorer.item_inputs`, e.g. from a cache).
    The query is prepared once for all the items (so a pair model picks its path from their number), unless
    `prepared` is given (the query prepared before, for a first batch of items: reused as it is). Chunks
    are sized from the model's widest activation (`activation_width()` where the model has one, else its spec)."""
    width = model.activation_width() if hasattr(model, "activation_width") else widest_activation(model.spec)
    step = chunk or max(MIN_CHUNK_ROWS, ACTIVATION_BUDGET_BYTES // (4 * width))
    if prepared is None:
        prepared = prepare_for(model, query, len(items))  # once per query, not per chunk

    def part(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model.score_prepared(prepared, rows if inputs else item_inputs(model, rows))

    if len(items) <= step:
        return part(items)
    parts = [part(items[i : i + step]) for i in range(0, len(items), step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


MIN_GEMM_ROWS = 4
"""CPU GEMM kernels (MKL / oneDNN) take another path for products of few rows (measured with torch 2.13 on this
machine, `benchmarks/bench_gemm_rows.py`: a row of a 1-row and of a 2-3-row `addmm` differs in the last bits from
the same row in a 4-15-row call, and those from a 16-row or larger one). A query's own chunk has the same rows
alone and in a batch, so padding it to 4 keeps its outputs the same either way; a product shared by several
queries changes its row count with the batch and is padded further (`models.pair.SHARED_GEMM_ROWS`)."""


def balanced_chunks(n: int, step: int) -> list[tuple[int, int]]:
    """[start, end) chunks of at most `step` rows covering n rows, as even as possible (so none is tiny)."""
    parts = max(1, -(-n // step))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def rows_at_least(x: torch.Tensor, n: int = MIN_GEMM_ROWS) -> torch.Tensor:
    """`x` padded with zero rows to at least n rows (the caller keeps only its own rows of the result)."""
    return x if len(x) >= n else torch.cat([x, x.new_zeros(n - len(x), *x.shape[1:])])


def score_many(model: Scorer, prepared: list[Any], items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, hidden) of several prepared queries, each against its own item inputs, concatenated in order.
    A model with `score_prepared_many` (a pair model) shares one pass over everything that does not depend on
    the query; any other scorer is called once per query (`score_chunked`). Either way every query's rows are
    what it gets scored alone."""
    many = getattr(model, "score_prepared_many", None)
    if many is not None:
        width = model.activation_width() if hasattr(model, "activation_width") else widest_activation(model.spec)
        step = max(MIN_CHUNK_ROWS, ACTIVATION_BUDGET_BYTES // (4 * width))
        return many(prepared, items, step)
    parts = [score_chunked(model, None, x, inputs=True, prepared=p) for p, x in zip(prepared, items, strict=True)]
    if not parts:
        raise ValueError("nothing to score")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
