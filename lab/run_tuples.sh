#!/usr/bin/env bash
# The n-tuple aggregation experiment of docs/aggregation.md, with one torch thread.
# Usage: lab/run_tuples.sh HOME OUT [extra `python -m lab.run_tuples` options]
# HOME must hold a registry with a dense model named `dense` (e.g. `prunecascade train --name dense`).
set -euo pipefail
HOME_DIR=${1:?HOME}; OUT=${2:?OUT}; shift 2
export OMP_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1
exec .venv/bin/python -m lab.run_tuples --home "$HOME_DIR" --out "$OUT" "$@"
