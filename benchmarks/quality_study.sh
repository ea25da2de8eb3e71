#!/usr/bin/env bash
# Issue 5's study on one 4-GPU machine, in calls of under 10 minutes each (docs/QUALITY.md):
#
#   bash benchmarks/quality_study.sh probe   # tokens/s of one run alone on a GPU, per setting (GPUs 0-3)
#   bash benchmarks/quality_study.sh a       # GPU 0: E=4 at the 10-minute budget; GPU 1: E=4 at the
#                                            # 15-minute budget (first half); GPUs 2,3: compare at 2 M tokens
#   bash benchmarks/quality_study.sh b       # GPU 1: second half of the 15-minute run; GPU 0: the levers
#                                            # and the paper recipe at 2 M tokens, then analyze;
#                                            # GPUs 2,3: benchmarks/scaling.py (issue 6)
#
# Budgets in minutes become token budgets at the rate the probe measured (one run alone on its GPU),
# so the runs' own logs say how many GPU-minutes they trained. Work files in $W (kept between calls on
# a warm machine), results packed into $OUT/quality-<phase>.tar.gz.
set -uo pipefail
PHASE=${1:?probe, a or b}
M=${M:-/tmp/smollm2.gguf}
W=${W:-/tmp/quality}
OUT=${OUT:-$W/out}
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
mkdir -p "$W" "$OUT"
bm() { python -m binarymos.cli "$@"; }
on() { local gpu=$1; shift; CUDA_VISIBLE_DEVICES=$gpu "$@"; }
rate() {  # tokens/s of a run's log between its 10th logged step and its last
    python - "$1" <<'EOF'
import json, sys
log = [json.loads(l) for l in open(sys.argv[1] + "/log.jsonl")]
a, b = log[min(10, len(log) - 2)], log[-1]
print(int((b["tokens"] - a["tokens"]) / (b["time"] - a["time"])))
EOF
}
PROBE="--model $M --data c4_wiki -E 4 --max-steps 60 --log-every 1 --save-every 1000000"

case $PHASE in
probe)
    on 0 bm train $PROBE --out "$W/probe-ckpt" > "$W/probe-ckpt.log" 2>&1 &
    on 1 bm train $PROBE --out "$W/probe-nockpt" --no-grad-checkpointing > "$W/probe-nockpt.log" 2>&1 &
    on 2 bm train $PROBE --out "$W/probe-b4" --no-grad-checkpointing --batch-size 4 > "$W/probe-b4.log" 2>&1 &
    on 3 bm train $PROBE --out "$W/probe-compile" --no-grad-checkpointing --compile > "$W/probe-compile.log" 2>&1 &
    wait
    for r in ckpt nockpt b4 compile; do echo "probe-$r $(rate "$W/probe-$r" 2>/dev/null || echo failed)"; done \
        | tee "$W/probe.txt"
    ;;
a)
    CKPT=$(rate "$W/probe-ckpt"); NOCKPT=$(rate "$W/probe-nockpt")
    FLAGS=""; RATE=$CKPT
    if [ "$NOCKPT" -gt "$CKPT" ]; then FLAGS="--no-grad-checkpointing"; RATE=$NOCKPT; fi
    echo "rate $RATE tokens/s, flags '$FLAGS'" | tee "$W/budget.txt"
    echo "$FLAGS" > "$W/flags.txt"
    T10=$((RATE * 480)); T15=$((RATE * 900))
    SAVE=$((RATE * 45 / 4096))  # a checkpoint every ~45 s at batch 2 x 2048
    on 0 timeout 560 bm train --model $M --data c4_wiki -E 4 --max-tokens $T10 $FLAGS --log-every 10 \
        --save-every 1000000000 --out "$W/min10" --ppl wikitext2,c4 > "$W/min10.log" 2>&1 &
    on 1 timeout 545 bm train --model $M --data c4_wiki -E 4 --max-tokens $T15 $FLAGS --log-every 10 \
        --save-every $SAVE --out "$W/min15" > "$W/min15.log" 2>&1 &
    bm compare --model $M --methods fp,sign,onebit,mos2,mos4,mos8 --max-tokens 2000000 --data c4_wiki \
        --gpus 2,3 --parallel 6 --threads 4 --deadline 530 --out "$W/cmp2M" > "$W/cmp2M.log" 2>&1 &
    wait
    ;;
b)
    FLAGS=$(cat "$W/flags.txt")
    T15=$(python -c "import json; print(json.load(open('$W/min15/train_config.json'))['max_tokens'])")
    on 1 timeout 560 bm train --model $M --data c4_wiki -E 4 --max-tokens $T15 $FLAGS --log-every 10 \
        --save-every 1000000000 --out "$W/min15" --resume --ppl wikitext2,c4 > "$W/min15-resume.log" 2>&1 &
    (python benchmarks/recipe_sweep.py --model $M --variants "${LEVERS:-paper,teacher,norms,clip2,lr4e-4}" \
        --gpus 0 --parallel 6 --threads 4 --deadline 480 --out "$W/levers" > "$W/levers.log" 2>&1
     on 0 timeout 60 bm analyze "$W/cmp2M/mos4" --out "$W/pictures" > "$W/analyze.log" 2>&1) &
    # issue 6 on the two other GPUs (benchmarks/scaling.py)
    CUDA_VISIBLE_DEVICES=2,3 BINARYMOS_BENCH_WORK="$W/scaling-work" timeout 570 python benchmarks/scaling.py \
        --model $M --out "$W/scaling" --steps 30 > "$W/scaling.log" 2>&1 &
    wait
    ;;
esac
tar czf "$OUT/quality-$PHASE.tar.gz" -C "$W" --exclude='*.pt' --exclude='model' --exclude='*.safetensors' \
    --exclude='checkpoint*' . 2>/dev/null
ls -la "$OUT"
