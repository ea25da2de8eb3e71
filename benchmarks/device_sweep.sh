#!/usr/bin/env bash
# One device call: a recipe sweep on the GPU; summaries land in $OUT.
# Usage (on the device, after the model parts are assembled to /tmp/smollm2.gguf):
#   bash benchmarks/device_sweep.sh VARIANTS [MAX_TOKENS] [PARALLEL] [EXTRA_TRAIN_OPTIONS]
set -u
variants=$1; tokens=${2:-2000000}; parallel=${3:-6}; extra=${4:-}
export PYTHONPATH=/tmp/site:src BINARYMOS_DATA_DIR=.device/data PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 benchmarks/recipe_sweep.py --deadline ${DEADLINE:-540} --model /tmp/smollm2.gguf --variants "$variants" \
  --max-tokens "$tokens" --parallel "$parallel" --threads 2 --out /tmp/sweep --train-extra="$extra" ${BASELINES:-}
cp /tmp/sweep/compare.* "$OUT"/ 2>/dev/null
tar czf "$OUT/logs.tgz" /tmp/sweep/*.log /tmp/sweep/*/log.jsonl 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv,noheader
