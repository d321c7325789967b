#!/usr/bin/env bash
# Issue 27: the paper's claims (Tables 1-4, 6), measured on Fashion-MNIST with DACNNs trained from scratch.
# One recipe per model in recipes/fashion-mnist/claims_*.yaml (the paper's AdaGrad + step schedule, scaled down
# to 2 epochs on 8,000 images at 32 px, fp32, to fit 2 CPU cores), two seeds each. Resumable: a row already in
# RESULTS is skipped, so a session cut off goes on where it stopped (a row cut off mid-run starts again).
#   bash benchmarks/paper_claims.sh                     # every row, seed 0 first, then seed 1
#   SEEDS=0 RECIPES=recipes/fashion-mnist/claims_dacnn_18_plain.yaml bash benchmarks/paper_claims.sh
#   FULL=1 bash benchmarks/paper_claims.sh              # on a GPU: the paper's 90 epochs on all 60,000 images
# Rows: RESULTS/<recipe>-seedN.json (+ _history.json); tables: RESULTS/README.md and docs/paper-tables.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DACNN=${DACNN:-dacnn}
PYTHON=${PYTHON:-python}
SEEDS=${SEEDS:-"0 1"}
RECIPES=${RECIPES:-$(ls recipes/fashion-mnist/claims_*.yaml)}
FULL=${FULL:-0}
extra=()
block=cpu
if [ "$FULL" = 1 ]; then
  block=full
  RESULTS=${RESULTS:-benchmarks/results/paper_claims_full}
  extra=(--epochs 90 --train-limit 60000 --device auto)
else
  RESULTS=${RESULTS:-benchmarks/results/paper_claims}
fi
OUT=${OUT:-runs/paper-claims}
mkdir -p "$RESULTS"
for seed in $SEEDS; do
  for recipe in $RECIPES; do
    name="$(basename "$recipe" .yaml)-seed$seed"
    [ -f "$RESULTS/$name.json" ] && continue
    start=$(date +%s)
    $DACNN recipe run "$recipe" --seed "$seed" --out "$OUT/$name" --overwrite ${extra[@]+"${extra[@]}"}
    cp "$OUT/$name/result.json" "$RESULTS/$name.json"
    [ -f "$OUT/$name/history.json" ] && cp "$OUT/$name/history.json" "$RESULTS/${name}_history.json"
    echo "$name: $(( ($(date +%s) - start) / 60 )) min ($(date -u +%Y-%m-%dT%H:%MZ))" >> "$RESULTS/wall_time.txt"
    $PYTHON benchmarks/paper_claims_summary.py "$RESULTS" --block "$block"
  done
done
