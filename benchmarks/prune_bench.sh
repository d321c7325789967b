#!/usr/bin/env bash
# Issue 5's benchmark: a ResNet-18 teacher trained by the toolkit on Fashion-MNIST, then every
# method at the size of DACNN mix + regulators, and again at the size of plain DACNN.
# Within a budget every method gets the same fine-tune (KD from the teacher); the plain budget
# uses a shorter one (EPOCHS_PLAIN on LIMIT_PLAIN images) to fit the session on 2 CPU cores.
#   bash benchmarks/prune_bench.sh                  # both budgets -> benchmarks/results/prune_bench/
#   BUDGETS=plain bash benchmarks/prune_bench.sh    # one budget (the teacher is reused)
set -euo pipefail
OUT=${OUT:-runs/prune-bench}
BUDGETS=${BUDGETS:-"mix-reg plain"}
EPOCHS=${EPOCHS:-4}
LIMIT=${LIMIT:-20000}
EPOCHS_PLAIN=${EPOCHS_PLAIN:-2}
LIMIT_PLAIN=${LIMIT_PLAIN:-10000}
DACNN=${DACNN:-dacnn}
RESULTS=benchmarks/results/prune_bench
if [ ! -f "$OUT/teacher/best.safetensors" ]; then
  start=$(date +%s)
  $DACNN train resnet18 --dataset fashion-mnist --epochs 5 --train-limit 30000 --lr 0.05 --out "$OUT/teacher"
  mkdir -p "$RESULTS"
  cp "$OUT/teacher/metrics.csv" "$RESULTS/teacher_metrics.csv"
  echo "teacher: $(( ($(date +%s) - start) / 60 )) min" >> "$RESULTS/wall_time.txt"
fi
teacher=(resnet18 --weights "$OUT/teacher/best.safetensors" --num-classes 10 --dataset fashion-mnist --lr 0.02)
for budget in $BUDGETS; do
  start=$(date +%s)
  if [ "$budget" = mix-reg ]; then
    $DACNN bench "${teacher[@]}" --epochs "$EPOCHS" --train-limit "$LIMIT" \
      --methods dacnn-mix-reg,dacnn-mix,sharesnet,magnitude,l1-filter,group-norm --match dacnn-mix-reg --out "$OUT/mix-reg"
  else
    $DACNN bench "${teacher[@]}" --epochs "$EPOCHS_PLAIN" --train-limit "$LIMIT_PLAIN" \
      --methods dacnn-plain,magnitude,l1-filter,group-norm --match dacnn-plain --out "$OUT/plain"
  fi
  mkdir -p "$RESULTS/$budget"
  cp "$OUT/$budget"/bench.{md,json,csv,png} "$RESULTS/$budget/"
  echo "$budget: $(( ($(date +%s) - start) / 60 )) min" >> "$RESULTS/wall_time.txt"
done
