#!/usr/bin/env bash
# The n-tuple aggregation experiment of docs/aggregation.md (research notes section 1).
# Usage: benchmarks/run_tuples.sh HOME OUT [extra `prunecascade tuples` options]
# HOME must hold a registry with a dense model named `dense` (e.g. `prunecascade train --name dense`).
set -euo pipefail
HOME_DIR=${1:?HOME}; OUT=${2:?OUT}; shift 2
export OMP_NUM_THREADS=1
exec .venv/bin/python - "$HOME_DIR" "$OUT" "$@" <<'PY'
import argparse, sys
import torch
torch.set_num_threads(1)
from service.commands import tuples
parser = argparse.ArgumentParser(prog="prunecascade")
tuples.register(parser.add_subparsers(dest="command", required=True))
home, out, *rest = sys.argv[1:]
args = parser.parse_args(["tuples", "--home", home, "--out", out, *rest])
raise SystemExit(args.func(args))
PY
