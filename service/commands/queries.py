"""`prunecascade queries`: the held-out queries by example that ship with a space, as JSON request bodies ready
to POST to /v1/query (so a user can try the main path without writing code)."""

from __future__ import annotations

import argparse
import json

from service.commands.common import add_home, settings_from

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("queries", help="print held-out queries by example as /v1/query bodies")
    add_home(p)
    p.add_argument("--offset", type=int, default=0, help="first query (0-based)")
    p.add_argument("--limit", type=int, default=1, help="how many (one JSON object per line)")
    p.add_argument("--k", type=int, default=10, help="k in the printed request bodies")
    p.add_argument("--body", action="store_true", help="print only the request bodies (pipe one into curl -d @-)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cascade.queries import QuerySet
    from cascade.space import Space

    if args.offset < 0 or args.limit < 1:
        raise ValueError("--offset must be >= 0 and --limit >= 1")
    settings = settings_from(args)
    queries = QuerySet.load(settings.space_dir)
    if queries is None:
        raise LookupError(f"{settings.space_dir} has no held-out queries (a space without pair models)")
    space = Space.load(settings.space_dir)  # the truth in the user's ids, as GET /v1/space/queries gives it
    for i in range(args.offset, min(args.offset + args.limit, len(queries))):
        body = {"target": {"examples": [[round(float(v), 6) for v in queries.x[i]]]}, "k": args.k}
        cluster_id = space.cluster_ids[int(queries.cluster[i])]  # type: ignore[index]
        label = space.class_labels[int(queries.label[i])]  # type: ignore[index]
        truth = {"index": i, "cluster_id": int(cluster_id), "label": int(label)}
        print(json.dumps(body if args.body else {"request": body, "truth": truth}))
    return 0
