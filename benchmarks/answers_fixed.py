"""Every figure of the answers to a fixed set of queries, as JSON: run it before and after a change to the query
path and compare the two files (they must be equal, bit for bit; latencies are left out).

The queries go through the real route in-process (FastAPI's test client, no socket), on a private copy of the
home (the exact table is built and saved beside the copy's space, never in the given home):

- 20 held-out queries by example with the default cascade (seed = the query's position),
- 5 queries by example with `stages: []` (FAISS only), 5 with explicit stages,
- 5 label queries answered exactly (`mode: exact`), 5 in `mode: cascade`,
- 3 utility queries (auto: the exact table once built), 1 in `mode: cascade`,
- a few bad requests (status and body).

    python -m benchmarks.answers_fixed --home var --out /tmp/answers.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LATENCIES = ("latency_ms", "ms")  # what a run measures rather than computes: left out


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in LATENCIES}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _requests(space_dir: Path, config: dict[str, Any], num_classes: int) -> list[tuple[str, dict[str, Any]]]:
    from cascade.queries import QuerySet

    out: list[tuple[str, dict[str, Any]]] = []
    qs = QuerySet.load(space_dir)
    if qs is not None and len(qs) >= 30:
        x = qs.x.tolist()
        for i in range(20):
            out.append((f"examples/default/{i}", {"target": {"examples": [x[i]]}, "k": 10, "seed": i}))
        for i in range(20, 25):
            out.append((f"examples/faiss/{i}", {"target": {"examples": [x[i]]}, "k": 10, "stages": []}))
        pair = config["pair_stages"]
        explicit = [
            {**pair[0], "samples": pair[0]["samples"] + 1, "keep": 30},
            {**pair[-1], "keep": None},
        ]
        for i in range(25, 30):
            body = {"target": {"examples": [x[i]]}, "k": 8, "stages": explicit, "seed": i, "candidates": 150}
            out.append((f"examples/explicit/{i}", body))
        two = {"target": {"examples": [x[0], x[1]], "gains": [0, 1, 2]}, "k": 5, "seed": 3}
        out.append(("examples/two-with-gains", two))
        many = {"target": {"examples": [x[0]] * 64}, "stages": [{"variant": config["pair_dense"], "samples": 256}]}
        out.append(("bad/budget", many))
        out.append(("bad/k-examples", {"target": {"examples": [x[0]]}, "k": 999}))
    for label in range(5):
        out.append((f"label/exact/{label}", {"target": {"label": label}, "k": 10, "mode": "exact"}))
    for label in range(5):
        body = {"target": {"label": (label + 5) % num_classes}, "k": 10, "mode": "cascade", "seed": label}
        out.append((f"label/cascade/{label}", body))
    utilities = [[1.0 if c == 0 else 0.0 for c in range(num_classes)]]
    utilities.append([float(c % 3) for c in range(num_classes)])
    utilities.append([0.5 - c / num_classes for c in range(num_classes)])
    for i, u in enumerate(utilities):
        out.append((f"utility/auto/{i}", {"target": {"utility": u}, "k": 7}))
    out.append(("utility/cascade", {"target": {"utility": utilities[1]}, "k": 7, "mode": "cascade", "seed": 2}))
    bad = [
        ("bad/k", {"target": {"label": 0}, "k": 100_000, "mode": "cascade"}),
        ("bad/label", {"target": {"label": 999}, "k": 5}),
        ("bad/exact-with-stages", {"target": {"label": 0}, "mode": "exact", "stages": [config["stages"][-1]]}),
        ("bad/variant", {"target": {"label": 0}, "mode": "cascade", "stages": [{"variant": "nope", "samples": 2}]}),
        (
            "bad/keep",
            {"target": {"label": 0}, "k": 10, "stages": [{**config["stages"][0], "keep": 3}, config["stages"][-1]]},
        ),
        ("bad/faiss-for-label", {"target": {"label": 0}, "stages": []}),
        ("bad/k-clusters", {"target": {"label": 1}, "k": 999, "mode": "cascade"}),
        ("bad/utility", {"target": {"utility": [0.0] * num_classes}}),
        ("bad/candidates", {"target": {"label": 0}, "candidates": 5}),
    ]
    return out + bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="a bootstrapped home (only read)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--wait", type=float, default=900.0, help="seconds to wait for the snapshot and table")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="answers-fixed-") as tmp:
        home = Path(tmp) / "home"
        shutil.copytree(args.home, home, ignore=shutil.ignore_patterns("data"))
        settings = Settings(home=home, cache_enabled=False, torch_threads=1, redis_url=None, log_level="warning")
        with TestClient(create_app(settings)) as client:
            deadline = time.monotonic() + args.wait
            while client.get("/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit("the snapshot did not load in time")
                time.sleep(0.5)
            while (state := client.get("/v1/space").json()["exact"]["state"]) != "ready":
                if state != "building" or time.monotonic() > deadline:
                    raise SystemExit(f"the exact table is {state!r}")
                time.sleep(0.5)
            space = client.get("/v1/space").json()
            config = client.get("/v1/cascade").json()
            answers: dict[str, Any] = {}
            for name, body in _requests(home / "spaces" / settings.space, config, int(space["num_classes"])):
                r = client.post("/v1/query", json=body)
                answers[name] = {"status": r.status_code, "body": _strip(r.json())}
    args.out.write_text(json.dumps(answers, indent=1, sort_keys=True))
    failed = [n for n, a in answers.items() if a["status"] != 200 and not n.startswith("bad/")]
    print(f"{len(answers)} answers written to {args.out}; {len(failed)} unexpected errors {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
