"""The one interface the cascade calls, whatever the kind of model.

A classifier maps an item to logits over classes and ignores the query: its cluster posteriors are the same
for every query, so they can be computed once (`cascade.exact`). A pair model (cross-encoder, `models.pair`)
reads the query and the item together: nothing can be precomputed, which is what the cascade is for. Both
answer `score(query, items) -> (logits, hidden)`, split into `prepare(query)` (once per query) and
`score_prepared(prepared, items)` (per chunk of items), so the engine never branches on the kind."""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import torch

__all__ = ["Scorer", "ScorerKind", "SCORER_KINDS"]

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
        """Logits (M x outputs) and hidden representations (M x H) of the M items for a prepared query."""
        ...

    def score(self, query: torch.Tensor | None, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`score_prepared(prepare(query), items)`: logits and hidden of the M items for `query` ((1, D) or None)."""
        ...
