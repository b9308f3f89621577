"""The one interface the cascade calls, whatever the kind of model.

A classifier maps an item to logits over classes and ignores the query: its cluster posteriors are the same
for every query, so they can be computed once (`cascade.exact`). A pair model (cross-encoder, `models.pair`)
reads the query and the item together: nothing can be precomputed per cluster, which is what the cascade is
for. Both answer `score(query, items) -> (logits, hidden)`, split into `prepare(query)` (once per query) and
`score_prepared(prepared, inputs)` (per chunk of items), so the engine never branches on the kind.

`score_prepared` reads *item inputs*: what the model needs per item that does not depend on the query. A
classifier reads the raw features (it has no such part). A pair model reads its trunk's features of the item,
which a snapshot computes once per item and caches, shared by every variant with the same trunk. The helpers
below give the answer for any scorer, so callers need no `if kind == ...`: `item_inputs`, `item_inputs_key`
(None: nothing worth caching) and `prepare_for` (a scorer may choose its path from the number of items; such a
model also counts its own FLOPs, `flops(n)`, on the path it picks: `cascade.snapshot.Variant.cost`)."""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import torch

__all__ = [
    "Scorer",
    "ScorerKind",
    "SCORER_KINDS",
    "item_inputs",
    "cluster_context",
    "item_inputs_key",
    "prepare_for",
    "prepare_many",
]

ScorerKind = Literal["classifier", "pair"]
SCORER_KINDS: tuple[ScorerKind, ...] = ("classifier", "pair")


@runtime_checkable
class Scorer(Protocol):
    scorer_kind: str
    """`classifier` (outputs are classes, the query is ignored) or `pair` (outputs are relevance grades)."""

    def prepare(self, query: torch.Tensor | None) -> Any:
        """What depends on the query alone, computed once per query (a pair model folds the query into its
        first layer; a classifier has nothing to do)."""
        ...

    def score_prepared(self, prepared: Any, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (M x outputs) and hidden representations (M x H) of M items, given as item inputs
        (`item_inputs`), for a prepared query."""
        ...

    def score(self, query: torch.Tensor | None, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same for raw items (M x D) and a raw query ((1, D) or None)."""
        ...


def item_inputs(model: Scorer, items: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """What `score_prepared` reads for raw items: the model's own `item_inputs` (a pair model: its trunk
    features), or the items themselves (a classifier). `context`: rows of `cluster_context` for these items
    (a pair model with a retriever stores its cluster's centroid beside each member)."""
    fn = getattr(model, "item_inputs", None)
    if fn is None:
        return items
    return fn(items) if context is None else fn(items, context)


def cluster_context(model: Scorer, items: torch.Tensor, offsets: Any) -> torch.Tensor | None:
    """What a model reads of an item's cluster as a whole (a pair model with a retriever: FAISS's centroid),
    one row per item of a space grouped by cluster (`offsets`); None for a model that reads items alone."""
    fn = getattr(model, "cluster_context", None)
    if fn is None or getattr(model, "retriever", None) is None:
        return None
    return fn(items, offsets)


def item_inputs_key(model: Scorer) -> str | None:
    """Models with equal keys compute equal item inputs (one cache serves them); None: the inputs are the raw
    items, nothing to cache."""
    fn = getattr(model, "item_inputs_key", None)
    return None if fn is None else fn()


def prepare_for(model: Scorer, query: torch.Tensor | None, num_items: int) -> Any:
    """`prepare(query)`, telling a model that chooses its path by the number of items (a pair model: fold
    the query or not) how many it will score."""
    if hasattr(model, "folds"):
        return model.prepare(query, num_items)  # type: ignore[call-arg]
    return model.prepare(query)


def prepare_many(model: Scorer, queries: list[torch.Tensor | None], num_items: list[int]) -> list[Any]:
    """`prepare_for` of several queries: one call where the model prepares many at once (a pair model folds
    them together), else one per query; either way each prepared query is the one `prepare_for` gives."""
    fn = getattr(model, "prepare_many", None)
    if fn is not None:
        return fn(queries, num_items)
    return [prepare_for(model, q, n) for q, n in zip(queries, num_items, strict=True)]
