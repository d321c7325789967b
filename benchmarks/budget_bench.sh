#!/usr/bin/env bash
# Issue 8's benchmark: the budget planner vs the hand-written modes and group-norm pruning,
# at 25%, 40% and 60% of the Fashion-MNIST ResNet-18 teacher's unique parameters (the teacher
# of benchmarks/prune_bench.sh), all with the same KD fine-tune. Fixed-size modes appear at
# their own size: compare the planner with the best of them at equal or smaller size.
#   bash benchmarks/budget_bench.sh        # results -> benchmarks/results/budget_bench/
set -euo pipefail
OUT=${OUT:-runs/prune-bench}
EPOCHS=${EPOCHS:-4}
LIMIT=${LIMIT:-20000}
DACNN=${DACNN:-dacnn}
RESULTS=benchmarks/results/budget_bench
[ -f "$OUT/teacher/best.safetensors" ] || { echo "run benchmarks/prune_bench.sh first (it trains the teacher)"; exit 1; }
for budget in 0.25 0.4 0.6; do
  $DACNN bench resnet18 --weights "$OUT/teacher/best.safetensors" --num-classes 10 --dataset fashion-mnist \
    --epochs "$EPOCHS" --train-limit "$LIMIT" --lr 0.02 --budget "$budget" \
    --methods dacnn-budget,dacnn-mix,dacnn-mix-reg,dacnn-plain,group-norm --out "$OUT/budget-$budget"
  mkdir -p "$RESULTS/$budget"
  cp "$OUT/budget-$budget"/bench.{md,json,csv,png} "$RESULTS/$budget/"
done
