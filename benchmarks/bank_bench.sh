#!/usr/bin/env bash
# Issue 13's benchmark: the planner's filter-bank model (dacnn-bank) against the baselines a user
# would pick instead, at 50%, 25% and 10% of the Fashion-MNIST ResNet-18 teacher's unique
# parameters (the teacher of benchmarks/prune_bench.sh). Every method gets the same BN
# recalibration (20 batches) and KD fine-tune (EPOCHS on LIMIT images, lr 0.02, fp32).
#   bash benchmarks/bank_bench.sh                                   # core methods, seed 0
#   TAG=more METHODS=l1-filter,magnitude bash benchmarks/bank_bench.sh
#   SEED=1 bash benchmarks/bank_bench.sh                            # another subset and data order
#   MODEL=resnet34 BUDGETS=0.25 bash benchmarks/bank_bench.sh       # a second architecture; its
#       teacher is trained first with the resnet18 teacher's recipe (OUT/teacher-resnet34)
# Each run lands in benchmarks/results/bank_bench/[MODEL-]BUDGET-TAG[-seedN]/ (bench.md/json/csv/png);
# a run already there is skipped, so the script resumes where a session stopped.
set -euo pipefail
OUT=${OUT:-runs/prune-bench}
EPOCHS=${EPOCHS:-4}
LIMIT=${LIMIT:-20000}
BUDGETS=${BUDGETS:-"0.25 0.1 0.5"}
METHODS=${METHODS:-dacnn-bank,group-norm,lowrank}
TAG=${TAG:-core}
SEED=${SEED:-0}
MODEL=${MODEL:-resnet18}
DACNN=${DACNN:-dacnn}
RESULTS=benchmarks/results/bank_bench
mkdir -p "$RESULTS"
prefix=""
teacher_dir="$OUT/teacher"
if [ "$MODEL" = resnet18 ]; then
  [ -f "$teacher_dir/best.safetensors" ] || { echo "run benchmarks/prune_bench.sh first (it trains the teacher)"; exit 1; }
else
  prefix="$MODEL-"
  teacher_dir="$OUT/teacher-$MODEL"
  if [ ! -f "$teacher_dir/best.safetensors" ]; then
    start=$(date +%s)
    $DACNN train "$MODEL" --dataset fashion-mnist --epochs 5 --train-limit 30000 --lr 0.05 --precision fp32 \
      --out "$teacher_dir"
    cp "$teacher_dir/metrics.csv" "$RESULTS/teacher-${MODEL}_metrics.csv"
    echo "teacher-$MODEL: $(( ($(date +%s) - start) / 60 )) min ($(date -u +%Y-%m-%dT%H:%MZ))" >> "$RESULTS/wall_time.txt"
  fi
fi
suffix=""
[ "$SEED" = 0 ] || suffix="-seed$SEED"
for budget in $BUDGETS; do
  name="$prefix$budget-$TAG$suffix"
  [ -f "$RESULTS/$name/bench.json" ] && continue
  start=$(date +%s)
  $DACNN bench "$MODEL" --weights "$teacher_dir/best.safetensors" --num-classes 10 --dataset fashion-mnist \
    --lr 0.02 --warmup-steps 0 --calib-batches 20 --epochs "$EPOCHS" --train-limit "$LIMIT" --seed "$SEED" \
    --precision fp32 \
    --budget "$budget" --methods "$METHODS" --out "$OUT/bank-$name"
  mkdir -p "$RESULTS/$name"
  cp "$OUT/bank-$name"/bench.{md,json,csv,png} "$RESULTS/$name/"
  echo "$name: $(( ($(date +%s) - start) / 60 )) min ($(date -u +%Y-%m-%dT%H:%MZ))" >> "$RESULTS/wall_time.txt"
done
