#!/usr/bin/env bash
# Issue 5's GPU study, in steps that each fit one 10-minute call (docs/QUALITY.md, docs/RESULTS.md):
#
#   bash benchmarks/quality_study.sh probe            # tokens/s of one run alone per GPU, 4 settings (GPUs 0-3)
#   bash benchmarks/quality_study.sh compare          # fp,sign,onebit,mos2,mos4,mos8 at 2 M tokens (GPUs 2,3)
#   bash benchmarks/quality_study.sh budget MINUTES   # E=4 alone on GPU 0 for MINUTES of training, then eval
#                                                     # (over 9 minutes: the same command again continues it)
#   bash benchmarks/quality_study.sh levers           # paper recipe and one lever at a time, 2 M tokens (GPU 0)
#
# budget: a 30-step probe measures this GPU's tokens/s with the default recipe, the run gets
# MINUTES x 60 x that many tokens, and `binarymos eval` scores the saved model afterwards (model loading
# and evaluation are outside the budget; the run's log has its own training time). Extra `binarymos
# train` options go in $TRAIN_ARGS. Work files in $W; results packed into $OUT/quality-<step>.tar.gz.
set -uo pipefail
STEP=${1:?probe, compare, budget or levers}
M=${M:-/tmp/smollm2.gguf}
W=${W:-/tmp/quality}
OUT=${OUT:-$W/out}
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
mkdir -p "$W" "$OUT"
BM="python -m binarymos.cli"
TRAIN="$BM train --model $M --data c4_wiki -E 4 --log-every 10 --save-every 1000000000"
rate() {  # tokens/s of a run's log between its 10th logged step and its last
    python - "$1" <<'EOF'
import json, sys
log = [json.loads(l) for l in open(sys.argv[1] + "/log.jsonl")]
a, b = log[min(10, len(log) - 2)], log[-1]
print(int((b["tokens"] - a["tokens"]) / (b["time"] - a["time"])))
EOF
}

case $STEP in
probe)
    P="$TRAIN --max-steps 60 --log-every 1"
    CUDA_VISIBLE_DEVICES=0 $P --out "$W/probe-ckpt" --batch-size 2 --grad-checkpointing > "$W/probe-ckpt.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 $P --out "$W/probe-nockpt" --batch-size 2 --no-grad-checkpointing > "$W/probe-nockpt.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=2 $P --out "$W/probe-b4" --batch-size 4 --no-grad-checkpointing > "$W/probe-b4.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=3 $P --out "$W/probe-compile" --batch-size 2 --no-grad-checkpointing --compile \
        > "$W/probe-compile.log" 2>&1 &
    wait
    for r in ckpt nockpt b4 compile; do echo "probe-$r $(rate "$W/probe-$r" || echo failed)"; done | tee "$W/probe.txt"
    ;;
compare)
    $BM compare --model $M --methods fp,sign,onebit,mos2,mos4,mos8 --max-tokens 2000000 --data c4_wiki \
        --gpus 2,3 --parallel 6 --threads 4 --deadline 530 --out "$W/cmp2M" > "$W/cmp2M.log" 2>&1
    cat "$W/cmp2M/compare.md"
    ;;
budget)
    MINUTES=${2:?minutes of training}
    RUN="$W/budget-${MINUTES}min"
    if [ -f "$RUN/checkpoint.pt" ]; then  # the second call of a budget longer than one call: resume
        TOKENS=$(python -c "import json; print(json.load(open('$RUN/train_config.json'))['max_tokens'])")
        RESUME=--resume
    else
        CUDA_VISIBLE_DEVICES=0 $TRAIN ${TRAIN_ARGS:-} --max-steps 30 --log-every 1 --out "$RUN-probe" > "$RUN-probe.log" 2>&1
        TOKENS=$(python -c "print(int($(rate "$RUN-probe") * 60 * $MINUTES))")
        echo "probe $(rate "$RUN-probe") tokens/s -> --max-tokens $TOKENS" | tee "$RUN.budget"
        RESUME=
    fi
    # a checkpoint about every minute; the run stops after TRAIN_SECONDS (default 9 min) and a second
    # call of the same command on the same (warm) machine continues it
    SAVE=$(( TOKENS / (MINUTES * 4 * 2048) + 1 ))
    CUDA_VISIBLE_DEVICES=0 timeout "${TRAIN_SECONDS:-540}" $TRAIN ${TRAIN_ARGS:-} --max-tokens "$TOKENS" \
        --save-every "$SAVE" --out "$RUN" $RESUME >> "$RUN.log" 2>&1
    if [ -d "$RUN/model" ]; then
        CUDA_VISIBLE_DEVICES=0 $BM eval --model "$RUN/model" --ppl wikitext2,c4 --json "$RUN/eval.json" > "$RUN-eval.log" 2>&1
        cat "$RUN/eval.json"
    fi
    tail -n 1 "$RUN/log.jsonl"
    ;;
levers)
    python benchmarks/recipe_sweep.py --model $M --variants "${LEVERS:-paper,teacher,norms,clip2,lr4e-4}" \
        --gpus 0 --parallel 6 --threads 4 --deadline 480 --out "$W/levers" > "$W/levers.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 60 $BM analyze "$W/levers/paper" --out "$W/pictures" > "$W/analyze.log" 2>&1
    cat "$W/levers/compare.md"
    ;;
esac
tar czf "$OUT/quality-$STEP.tar.gz" -C "$W" --exclude='*.pt' --exclude='model' --exclude='*.safetensors' \
    --exclude='checkpoint*' . 2>/dev/null
