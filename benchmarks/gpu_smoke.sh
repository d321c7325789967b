#!/usr/bin/env bash
# Issue 14's CUDA smoke: every training command on a GPU with a few batches, torchrun with one
# process, and a paper recipe for a few epochs. Run it on a machine with a GPU (the `device`
# tool) from the repository root; it prints the device and writes everything under OUT.
#   OUT=/tmp/gpu bash benchmarks/gpu_smoke.sh 2>&1 | tee gpu_smoke.log
# Commit its output as benchmarks/results/gpu_smoke/RUN-DATE.log, with the device it names.
set -euo pipefail
OUT=${OUT:-runs/gpu-smoke}
mkdir -p "$OUT"
# Run from the source tree (a device machine is bare and offline: no pip install; missing packages
# travel as wheels, see the device tool's README). Fashion-MNIST when its files are there, else synthetic.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA=${DATA:-fashion-mnist}
if [ "$DATA" = fashion-mnist ] && [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -d "${DACNN_DATA:-$HOME/.cache/dacnn}/fashion-mnist" ]; then
  DATA=synthetic
fi
dacnn() { python -m dacnn_convert.cli "$@"; }
dacnn-convert() { python -m dacnn_convert.cli convert "$@"; }
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
PY
step() { echo "== $*"; start=$(date +%s); "$@"; echo "== ok in $(( $(date +%s) - start )) s"; }
SYN=(--dataset "$DATA" --train-limit 2048 --limit-batches 8 --device cuda)
step dacnn train resnet18 "${SYN[@]}" --epochs 1 --out "$OUT/teacher"
step dacnn-convert resnet18 --weights "$OUT/teacher/best.safetensors" --num-classes 10 --mode bank \
  "${SYN[@]}" --epochs 1 --out "$OUT/bank"
step dacnn-convert resnet18 --weights "$OUT/teacher/best.safetensors" --num-classes 10 --mode mix \
  --regulators all "${SYN[@]}" --epochs 1 --precision fp16 --out "$OUT/mix-fp16"
step dacnn bench resnet18 --weights "$OUT/teacher/best.safetensors" --num-classes 10 "${SYN[@]}" \
  --epochs 1 --budget 0.5 --methods dacnn-bank,group-norm --latency-repeats 5 --out "$OUT/bench"
step torchrun --nproc_per_node=1 -m dacnn_convert.cli distill resnet18 --weights "$OUT/teacher/best.safetensors" \
  --num-classes 10 --mode bank "${SYN[@]}" --epochs 1 --out "$OUT/torchrun"
step dacnn latency "$OUT/bank/model.safetensors" --device cuda --batch 1,64 --precision fp32,fp16 --input-size 32
step dacnn recipe run recipes/cifar10/table7_dacnn_18_mix_reg_cifar_10.yaml --dataset "$DATA" \
  --epochs 3 --train-limit 10000 --device cuda --out "$OUT/recipe"
echo "== all steps passed on $(python -c 'import torch; print(torch.cuda.get_device_name(0))')"
