#!/usr/bin/env bash
# Issue 25's benchmark: size and speed together on the Fashion-MNIST ResNet-18 teacher of
# benchmarks/prune_bench.sh, with bank_bench.sh's fine-tune (BN recalibration on 20 batches, KD for
# EPOCHS on LIMIT images, lr 0.02, fp32), so its group-norm rows are the reference.
#   POINTS: the planner with both targets at group-norm's own point (group-norm re-run beside it): --budget B and
#           --budget-macs = group-norm's MACs / the teacher's, read from bank_bench/B-core[-seedN]/bench.json
#   MACS:   a MAC budget alone (fraction of the teacher's MACs): dacnn-bank, group-norm, lowrank
#   bash benchmarks/speed_bench.sh                         # POINTS="0.25 0.1", MACS="0.5 0.25", seed 0
#   SEED=1 POINTS=0.25 MACS= bash benchmarks/speed_bench.sh
#   PLANNER=dacnn-prune POINTS=0.25 MACS= bash benchmarks/speed_bench.sh   # the planner with pruning in its space,
#     group-norm re-run beside it (latency compares only within one run; dacnn-bank: the runs without the suffix)
#   FAMILY=timm:mobilenetv3_large_100 PLANNER=dacnn-prune POINTS=0.25 MACS= bash benchmarks/speed_bench.sh
#     the depthwise-separable family issue 25 asks for: the teacher and group-norm's point from
#     benchmarks/family_bench.sh (run it for that model and budget first), with its fine-tune (2 epochs of KD on
#     10,000 images, lr 0.005, 20-step warm-up, gradient clipping at 5)
# Each run lands in benchmarks/results/speed_bench/[FAMILY-]{point,macs}-F[-seedN]/; a finished run is skipped.
set -euo pipefail
FAMILY=${FAMILY:-}
SEED=${SEED:-0}
POINTS=${POINTS-"0.25 0.1"}
MACS=${MACS-"0.5 0.25"}
PLANNER=${PLANNER:-dacnn-bank}
DACNN=${DACNN:-dacnn}
RESULTS=benchmarks/results/speed_bench
seeded=""
[ "$SEED" = 0 ] || seeded="-seed$SEED"
if [ -z "$FAMILY" ]; then
  OUT=${OUT:-runs/prune-bench}
  EPOCHS=${EPOCHS:-4}
  LIMIT=${LIMIT:-20000}
  teacher="$OUT/teacher/best.safetensors"
  [ -f "$teacher" ] || { echo "run benchmarks/prune_bench.sh first (it trains the teacher)"; exit 1; }
  common=(resnet18 --weights "$teacher" --num-classes 10 --dataset fashion-mnist --lr 0.02
    --calib-batches 20 --epochs "$EPOCHS" --train-limit "$LIMIT" --seed "$SEED" --precision fp32)
  prefix=""
  reference() { echo "benchmarks/results/bank_bench/$1-core$seeded/bench.json"; }
else
  OUT=${OUT:-runs/family-bench}
  EPOCHS=${EPOCHS:-2}
  LIMIT=${LIMIT:-10000}
  tag=${FAMILY//:/-}
  teacher="$OUT/teacher-$tag/best.safetensors"
  [ -f "$teacher" ] || { echo "run MODELS=$FAMILY benchmarks/family_bench.sh first (it trains the teacher)"; exit 1; }
  common=("$FAMILY" --weights "$teacher" --num-classes 10 --dataset fashion-mnist --lr 0.005 --warmup-steps 20
    --clip-grad 5 --calib-batches 20 --epochs "$EPOCHS" --train-limit "$LIMIT" --seed "$SEED" --precision fp32)
  prefix="$tag-"
  reference() {  # group-norm's row: in the run's folder, or where a re-run of the planner's rows left it
    local d=benchmarks/results/family_bench
    if grep -qs '"group-norm"' "$d/$tag-$1$seeded/bench.json"; then echo "$d/$tag-$1$seeded/bench.json"
    else echo "$d/before-head-fix/$tag-$1$seeded/bench.json"; fi
  }
fi
mkdir -p "$RESULTS"
suffix=$seeded
others=",group-norm"
[ "$PLANNER" = dacnn-bank ] || suffix="$suffix-${PLANNER#dacnn-}"
run() {  # name, then the bench's own flags
  local name=$prefix$1; shift
  [ -f "$RESULTS/$name/bench.json" ] && return 0
  local start; start=$(date +%s)
  $DACNN bench "${common[@]}" "$@" --out "$OUT/speed-$name" --overwrite
  mkdir -p "$RESULTS/$name"
  cp "$OUT/speed-$name"/bench.{md,json,csv,png} "$RESULTS/$name/"
  echo "$name: $(( ($(date +%s) - start) / 60 )) min ($(date -u +%Y-%m-%dT%H:%MZ))" >> "$RESULTS/wall_time.txt"
}
for budget in $POINTS; do
  ref=$(reference "$budget")
  [ -f "$ref" ] || { echo "no group-norm reference at $ref: run its bench (bank_bench.sh, or family_bench.sh) with SEED=$SEED BUDGETS=$budget"; exit 1; }
  fraction=$(python -c "
import json, sys
d = json.load(open('$ref'))
gn = [r for r in d['rows'] if r['method'] == 'group-norm'][0]
print(f\"{gn['macs'] / d['teacher']['macs']:.6f}\")")
  run "point-$budget$suffix" --budget "$budget" --budget-macs "$fraction" --methods "$PLANNER$others"
done
for fraction in $MACS; do
  run "macs-$fraction$suffix" --budget-macs "$fraction" --methods "$PLANNER${others:+$others,lowrank}"
done
