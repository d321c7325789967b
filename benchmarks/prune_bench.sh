#!/usr/bin/env bash
# Issue 5's benchmark: a ResNet-18 teacher trained by the toolkit on Fashion-MNIST, then every
# method at the size of DACNN mix + regulators, and again at the size of plain DACNN.
# Same fine-tune for all (KD from the teacher, EPOCHS epochs on LIMIT images). CPU, a bit over an hour on 2 cores.
#   bash benchmarks/prune_bench.sh            # results -> benchmarks/results/prune_bench/
set -euo pipefail
OUT=${OUT:-runs/prune-bench}
EPOCHS=${EPOCHS:-4}
LIMIT=${LIMIT:-20000}
DACNN=${DACNN:-dacnn}
RESULTS=benchmarks/results/prune_bench
start=$(date +%s)
if [ ! -f "$OUT/teacher/best.safetensors" ]; then
  $DACNN train resnet18 --dataset fashion-mnist --epochs 5 --train-limit 30000 --lr 0.05 --out "$OUT/teacher"
fi
common=(resnet18 --weights "$OUT/teacher/best.safetensors" --num-classes 10 --dataset fashion-mnist
        --epochs "$EPOCHS" --train-limit "$LIMIT" --lr 0.02)
$DACNN bench "${common[@]}" --methods dacnn-mix-reg,dacnn-mix,sharesnet,magnitude,l1-filter,group-norm \
  --match dacnn-mix-reg --out "$OUT/mix-reg"
$DACNN bench "${common[@]}" --methods dacnn-plain,magnitude,l1-filter,group-norm --match dacnn-plain --out "$OUT/plain"
for budget in mix-reg plain; do
  mkdir -p "$RESULTS/$budget"
  cp "$OUT/$budget"/bench.{md,json,csv,png} "$RESULTS/$budget/"
done
cp "$OUT/teacher/metrics.csv" "$RESULTS/teacher_metrics.csv"
echo "total wall time: $(( ($(date +%s) - start) / 60 )) min" | tee "$RESULTS/wall_time.txt"
