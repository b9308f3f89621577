"""The cluster reader's item table in float32 and float16, side by side in one run (not a test): its bytes, the
time to build it, and the reader's dev check with each (the same reader, the same dev queries).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_reader_cache --home /work/homes/h3r
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from benchmarks.common import load_snapshot_from, set_threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--space", default="default")
    p.add_argument("--candidates", type=int, default=10)
    args = p.parse_args(argv)
    set_threads(1)
    from cascade.reader_gate import check_reader
    from cascade.snapshot import ItemCache

    base = load_snapshot_from(args.home, args.space)
    if base.reader is None:
        raise SystemExit(f"{args.home} holds no cluster reader beside its space {args.space!r}")
    for dtype in ("float32", "float16"):
        snapshot = dataclasses.replace(base, item_cache=ItemCache(dtype=dtype))
        table = snapshot.reader_inputs()
        check = check_reader(snapshot, args.candidates)
        row = {"dtype": dtype, "bytes": table.nbytes, "items": int(table.table.shape[0]), "build_ms": table.build_ms}
        print(json.dumps({**row, "bytes_per_item": table.nbytes / row["items"], "dev": check.dev}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
