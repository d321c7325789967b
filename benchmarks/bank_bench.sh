#!/usr/bin/env bash
# Issue 13's benchmark: the planner's filter-bank model (dacnn-bank) against the baselines a user
# would pick instead, at 50%, 25% and 10% of the Fashion-MNIST ResNet-18 teacher's unique
# parameters (the teacher of benchmarks/prune_bench.sh). Every method gets the same BN
# recalibration (20 batches) and KD fine-tune (EPOCHS on LIMIT images, lr 0.02, fp32).
#   bash benchmarks/bank_bench.sh                                   # core methods, seed 0
#   TAG=more METHODS=l1-filter,magnitude bash benchmarks/bank_bench.sh
#   SEED=1 bash benchmarks/bank_bench.sh                            # another subset and data order
# Each run lands in benchmarks/results/bank_bench/BUDGET-TAG[-seedN]/ (bench.md/json/csv/png);
# a run already there is skipped, so the script resumes where a session stopped.
set -euo pipefail
OUT=${OUT:-runs/prune-bench}
EPOCHS=${EPOCHS:-4}
LIMIT=${LIMIT:-20000}
BUDGETS=${BUDGETS:-"0.25 0.1 0.5"}
METHODS=${METHODS:-dacnn-bank,group-norm,lowrank}
TAG=${TAG:-core}
SEED=${SEED:-0}
DACNN=${DACNN:-dacnn}
RESULTS=benchmarks/results/bank_bench
[ -f "$OUT/teacher/best.safetensors" ] || { echo "run benchmarks/prune_bench.sh first (it trains the teacher)"; exit 1; }
suffix=""
[ "$SEED" = 0 ] || suffix="-seed$SEED"
mkdir -p "$RESULTS"
for budget in $BUDGETS; do
  name="$budget-$TAG$suffix"
  [ -f "$RESULTS/$name/bench.json" ] && continue
  start=$(date +%s)
  $DACNN bench resnet18 --weights "$OUT/teacher/best.safetensors" --num-classes 10 --dataset fashion-mnist \
    --lr 0.02 --epochs "$EPOCHS" --train-limit "$LIMIT" --seed "$SEED" --precision fp32 \
    --budget "$budget" --methods "$METHODS" --out "$OUT/bank-$name"
  mkdir -p "$RESULTS/$name"
  cp "$OUT/bank-$name"/bench.{md,json,csv,png} "$RESULTS/$name/"
  echo "$name: $(( ($(date +%s) - start) / 60 )) min ($(date -u +%Y-%m-%dT%H:%MZ))" >> "$RESULTS/wall_time.txt"
done
