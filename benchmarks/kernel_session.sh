#!/usr/bin/env bash
# Issue 4's GPU session on one GPU, detached so that it outlives one device call (10 minutes at most):
#   bash benchmarks/kernel_session.sh start          # returns at once
#   bash benchmarks/kernel_session.sh poll SECONDS   # waits (at most SECONDS), shows progress, copies results to $OUT
# In order, from a copy of the code, each step's table and log into $W: the one-token sweep of the CUDA LUT kernel's
# block shapes against the GEMV's default tile (SWEEP=1: every one-token config), linear_latency at M = 1 and 16 (and
# its float64 check at every M), end-to-end decode with the LUT kernel and with the Triton GEMV (BINARYMOS_LUT=0),
# and decode of the LLaMA-2-7B shape at batch 1 with torch.compile, both ways.
set -uo pipefail
W=${W:-/tmp/kernels}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
case ${1:?start or poll} in
start)
    if [ ! -f "$W/started" ]; then
        touch "$W/started"
        rm -rf "$W/code" && mkdir -p "$W/code" && cp -r src benchmarks "$W/code/"
        setsid nohup bash "$W/code/benchmarks/kernel_session.sh" steps > "$W/session.log" 2>&1 < /dev/null &
    fi
    ;;
steps)  # what `start` runs detached
    cd "$W/code" && export PYTHONPATH=src PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > "$W/device.txt"
    python benchmarks/linear_latency.py --sweep --m 1 $([ -z "${SWEEP:-}" ] && echo --variants LUT,default) > "$W/sweep.log" 2>&1
    python benchmarks/linear_latency.py --m 1,16 --out "$W/linear_latency.md" > "$W/linear_latency.log" 2>&1
    python benchmarks/decode.py --out "$W/decode.md" > "$W/decode.log" 2>&1
    BINARYMOS_LUT=0 python benchmarks/decode.py --out "$W/decode_gemv.md" > "$W/decode_gemv.log" 2>&1
    for lut in 1 0; do
        BINARYMOS_LUT=$lut python benchmarks/decode.py --compile --models llama-2-7b --batch 1 \
            --out "$W/decode_compile_lut$lut.md" > "$W/decode_compile_lut$lut.log" 2>&1
    done
    touch "$W/done"
    ;;
poll)
    for ((i = 0; i < ${2:-540} / 10; i++)); do
        [ -f "$W/done" ] && break
        sleep 10
    done
    [ -f "$W/done" ] && echo "session done" || echo "session still running"
    for log in "$W"/*.log; do
        echo "== $(basename "$log"): $(tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -n 4)"
    done
    tar -czf "$OUT/kernel_session.tgz" -C "$W" $(cd "$W" && ls *.md *.log *.txt 2>/dev/null)  # one file: $OUT takes 8
    ;;
esac
