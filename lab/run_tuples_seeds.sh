#!/usr/bin/env bash
# docs/aggregation.md "Scope": `python -m lab.run_tuples --source both` for several seeds, one after another, 1 torch thread.
# Usage: lab/run_tuples_seeds.sh HOME OUTDIR SEED... (writes OUTDIR/tuples-sSEED/ and OUTDIR/tuples-sSEED.log)
# HOME: a bootstrap home whose registry holds `dense` and its fine-tuned variants (see docs/aggregation.md).
set -uo pipefail
HOME_DIR=${1:?HOME}; OUT=${2:?OUTDIR}; shift 2
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PRUNECASCADE_TORCH_THREADS=1
for S in "$@"; do
  echo "seed $S start $(date -u +%T)"
  .venv/bin/python -m lab.run_tuples --home "$HOME_DIR" --source both --methods magnitude \
    --keeps 0.5,0.25,0.1,0.05,0.02 --budgets 0.01,0.02,0.05,0.1,0.25,0.5,1,2 --seed "$S" \
    --out "$OUT/tuples-s$S" --no-plots > "$OUT/tuples-s$S.log" 2>&1
  echo "seed $S rc $? end $(date -u +%T)"
done
