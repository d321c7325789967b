#!/usr/bin/env bash
# Issue 8's benchmark: the budget planner vs the hand-written modes and group-norm pruning,
# at 25%, 40% and 60% of the Fashion-MNIST ResNet-18 teacher's unique parameters (the teacher
# of benchmarks/prune_bench.sh), all with the same KD fine-tune (EPOCHS on LIMIT images,
# BN recalibration first, seed 0).
#
# The hand modes have one size each, whatever the budget, so they run once:
#   - dacnn-plain here (HAND);
#   - dacnn-mix and dacnn-mix-reg are read from prune_bench's mix-reg run, which used the same
#     teacher, fine-tune and seed (the fine-tune is deterministic; HAND=dacnn-plain,dacnn-mix,dacnn-mix-reg
#     reruns them here instead).
# Then benchmarks/budget_summary.py merges everything into one table and plot.
#   bash benchmarks/budget_bench.sh           # results -> benchmarks/results/budget_bench/
#   SEED=1 bash benchmarks/budget_bench.sh    # a repeat: another 20k-image subset and data order,
#                                             # planner and group-norm only -> budget_bench/BUDGET-seed1/
set -euo pipefail
OUT=${OUT:-runs/prune-bench}
EPOCHS=${EPOCHS:-4}
LIMIT=${LIMIT:-20000}
BUDGETS=${BUDGETS:-"0.25 0.4 0.6"}
HAND=${HAND:-dacnn-plain}
DACNN=${DACNN:-dacnn}
PYTHON=${PYTHON:-python}
SEED=${SEED:-0}
RESULTS=benchmarks/results/budget_bench
[ -f "$OUT/teacher/best.safetensors" ] || { echo "run benchmarks/prune_bench.sh first (it trains the teacher)"; exit 1; }
teacher=(resnet18 --weights "$OUT/teacher/best.safetensors" --num-classes 10 --dataset fashion-mnist
         --lr 0.02 --epochs "$EPOCHS" --train-limit "$LIMIT" --seed "$SEED")
mkdir -p "$RESULTS"
run() {  # run NAME ARGS...: one bench, its files copied to the results, its wall time logged
  local name=$1; shift
  local start; start=$(date +%s)
  $DACNN bench "${teacher[@]}" "$@" --out "$OUT/budget-$name"
  mkdir -p "$RESULTS/$name"
  cp "$OUT/budget-$name"/bench.{md,json,csv,png} "$RESULTS/$name/"
  echo "$name: $(( ($(date +%s) - start) / 60 )) min" >> "$RESULTS/wall_time.txt"
}
suffix=""
[ "$SEED" = 0 ] || suffix="-seed$SEED"
[ "$SEED" != 0 ] || [ -f "$RESULTS/hand/bench.json" ] || run hand --methods "$HAND" --match "${HAND%%,*}"
for budget in $BUDGETS; do
  [ -f "$RESULTS/$budget$suffix/bench.json" ] || run "$budget$suffix" --budget "$budget" --methods dacnn-budget,group-norm
done
$PYTHON benchmarks/budget_summary.py --results "$RESULTS" --reuse benchmarks/results/prune_bench/mix-reg/bench.json
