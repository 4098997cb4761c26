#!/usr/bin/env bash
# One GPU session's checks (docs/gpu-hpc.md): the CUDA path of training and MC
# dropout, and the convergence sweep that chose the demo's train settings, on the
# DEVELOPMENT cohort (synth seed 2026, cohort seed 7) in COHORT (default .dev/cohort).
# Usage: benchmarks/device_check.sh OUT_DIR [COHORT] [PARAMS]
set -uo pipefail
OUT=${1:?out dir}; COHORT=${2:-.dev/cohort}; PARAMS=${3:-.dev/params.yaml}
PY=${PYTHON:-python3}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
# 1. Training throughput, bf16 autocast against fp32 in the same run: demo and study patches.
[ "${SWEEP2:-0}" = 1 ] || $PY benchmarks/train_throughput.py --device cuda --shape 64,48,16 --channels 16,32,64,128 --classes 11 --steps 20 | tee "$OUT/throughput.txt"
[ "${SWEEP2:-0}" = 1 ] || $PY benchmarks/train_throughput.py --device cuda --shape 128,128,64 --channels 16,32,64,128 --classes 11 --steps 10 | tee -a "$OUT/throughput.txt"
# 2. Batched MC dropout against a loop of T passes (with and without AMP).
[ "${SWEEP2:-0}" = 1 ] || $PY benchmarks/mc_dropout.py --device cuda --amp --channels 16,32,64,128 --n-classes 11 --params "$PARAMS" | tee "$OUT/mc_dropout.txt"
# 3. Convergence sweep on site A of the development cohort (val Dice every cap/20 steps).
if [ "${SWEEP2:-0}" != 1 ]; then
S="val_checks=20;patience=0"
W="channels=16,32,64,128"
$PY benchmarks/convergence.py "$COHORT" --site A --params "$PARAMS" --device cuda \
  --setting "base:" \
  --setting "b960:steps=960;$S" --setting "b1920:steps=1920;$S" \
  --setting "w240:$W;$S" --setting "w480:$W;steps=480;$S" --setting "w960:$W;steps=960;$S" \
  --setting "w960d2:$W;steps=960;dropout=0.2;$S" \
  --setting "w960full:$W;steps=960;patch_size=64,48,32;$S" \
  --setting "x960:channels=32,64,128,256;steps=960;$S" \
  --out "$OUT/convergence_A.csv" 2>&1 | grep -v Warning | tee "$OUT/convergence_A.log"
$PY benchmarks/convergence.py "$COHORT" --site D --params "$PARAMS" --device cuda \
  --setting "base:" --setting "w960:$W;steps=960;$S" --setting "b1920:steps=1920;$S" \
  --out "$OUT/convergence_D.csv" 2>&1 | grep -v Warning | tee "$OUT/convergence_D.log"
fi
# 4. Second sweep (after 3.): what converges within a CPU budget: learning rate, width,
#    batch, residual units, at 320-480 steps.
if [ "${SWEEP2:-0}" = 1 ]; then
S="val_checks=16;patience=0"
$PY benchmarks/convergence.py "$COHORT" --site A --params "$PARAMS" --device cuda \
  --setting "b480:steps=480;$S" --setting "b480lr10:steps=480;learning_rate=0.01;$S" \
  --setting "b480lr10bs4:steps=480;learning_rate=0.01;batch_size=4;$S" \
  --setting "b480lr10r0:steps=480;learning_rate=0.01;num_res_units=0;$S" \
  --setting "m480lr10:channels=12,24,48,96;steps=480;learning_rate=0.01;$S" \
  --setting "w320lr10:channels=16,32,64,128;steps=320;learning_rate=0.01;$S" \
  --setting "w480lr10:channels=16,32,64,128;steps=480;learning_rate=0.01;$S" \
  --setting "b960lr10:steps=960;learning_rate=0.01;$S" \
  --out "$OUT/convergence2_A.csv" 2>&1 | grep -v Warning | tee "$OUT/convergence2_A.log"
$PY benchmarks/convergence.py "$COHORT" --site D --params "$PARAMS" --device cuda \
  --setting "b480lr10:steps=480;learning_rate=0.01;$S" \
  --setting "m480lr10:channels=12,24,48,96;steps=480;learning_rate=0.01;$S" \
  --setting "w480lr10:channels=16,32,64,128;steps=480;learning_rate=0.01;$S" \
  --out "$OUT/convergence2_D.csv" 2>&1 | grep -v Warning | tee "$OUT/convergence2_D.log"
fi
