#!/usr/bin/env bash
# Issue 4's GPU session on one GPU, detached so that it outlives one device call (10 minutes at most):
#   bash benchmarks/kernel_session.sh start          # returns at once
#   bash benchmarks/kernel_session.sh poll SECONDS   # waits (at most SECONDS), shows progress, packs results into
#                                                    # $OUT/kernel_session.tgz
# In order, from a copy of the code, each step's table and log into $W: linear_latency at M = 1 and 16
# (and its float64 check at every M), end-to-end decode, the one-token tile sweep (with SWEEP=1), and
# decode of the LLaMA-2-7B shape at batch 1 with torch.compile.
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
    python benchmarks/linear_latency.py --m 1,16 --out "$W/linear_latency.md" > "$W/linear_latency.log" 2>&1
    python benchmarks/decode.py --out "$W/decode.md" > "$W/decode.log" 2>&1
    [ -n "${SWEEP:-}" ] && python benchmarks/linear_latency.py --sweep --m 1 > "$W/sweep.log" 2>&1
    python benchmarks/decode.py --compile --models llama-2-7b --batch 1 --out "$W/decode_compile.md" \
        > "$W/decode_compile.log" 2>&1
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
