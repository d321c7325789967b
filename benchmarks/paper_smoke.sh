#!/usr/bin/env bash
# Every paper recipe end to end, short: one epoch of two batches on synthetic data (no CIFAR
# offline, no GPU here). Shows each recipe runs; the accuracies mean nothing.
#   bash benchmarks/paper_smoke.sh     # results -> benchmarks/results/paper/smoke/
set -euo pipefail
DACNN=${DACNN:-dacnn}
RESULTS=benchmarks/results/paper/smoke
mkdir -p "$RESULTS"
for recipe in recipes/cifar100/*.yaml recipes/cifar10/*.yaml recipes/svhn/*.yaml; do
  stem=$(basename "$recipe" .yaml)
  out="runs/paper-smoke/$(basename "$(dirname "$recipe")")-$stem"
  $DACNN recipe run "$recipe" --dataset synthetic --epochs 1 --limit-batches 2 --batch-size 32 --out "$out" > /dev/null
  cp "$out/result.json" "$RESULTS/$(basename "$(dirname "$recipe")")-$stem.json"
  echo "$recipe ok"
done
$DACNN table accuracy --results "$RESULTS" > "$RESULTS/README.md"
