#!/usr/bin/env bash
# Issue 5's GPU study (docs/QUALITY.md, docs/RESULTS.md). Steps:
#
#   bash benchmarks/quality_study.sh session      # 4 GPUs, ~23 minutes, detached (below); returns at once
#   bash benchmarks/quality_study.sh session gemma  # 1-2 GPUs, ~24 / 12 minutes: the second architecture
#   bash benchmarks/quality_study.sh session x2     # 2 GPUs, ~8 minutes: issue 6's planner check and noise floor
#   bash benchmarks/quality_study.sh session bf16   # 1 GPU, ~22 minutes: --bf16-compute (and --compile) against the default
#   bash benchmarks/quality_study.sh session throughput  # 1 GPU, ~12 minutes: sampling caches, compiled training parts
#   bash benchmarks/quality_study.sh session teacher     # 1 GPU, ~12 minutes a run: E=4 on real text, and with teacher text
#   bash benchmarks/quality_study.sh session ab          # 1 GPU, ~15 minutes: the same pair sharing the GPU at once
#   bash benchmarks/quality_study.sh session fused       # 1 GPU, ~10 minutes + runs: the fused training layer, then RUNS
#   bash benchmarks/quality_study.sh session study9      # 2 GPUs, ~15 minutes: six recipes at 10 M tokens, 3 per GPU
#   RUNS="e4:20" bash benchmarks/quality_study.sh session alone  # 1 GPU: each run of RUNS alone, one after the other
#                                   # (NAME:MINUTES or NAME:10M for 10 M tokens; NAME e4, eN, paper, bN, bwN, lr2,
#                                   # lr05, hidN, seqN, norms, alltext, teachN, graphs, cache, anneal10, anneal25, xnoiseN or gemma, joined by +: lanes-alone below)
#   bash benchmarks/quality_study.sh poll SECONDS # waits for the session (at most SECONDS), packs results
#   (the alltext lever reads the calib text from the exllamav2 wheel: put it beside gguf's in .device/whl,
#   `pip download --no-deps -d .device/whl exllamav2`, before device-pack.sh's second call)
#   bash benchmarks/quality_study.sh budget MINUTES [GPU]  # E=4 for MINUTES of training ($TRAIN_ARGS), eval
#   bash benchmarks/quality_study.sh probe        # tokens/s of one run alone per GPU, 4 settings (GPUs 0-3)
#   bash benchmarks/quality_study.sh compare      # fp,sign,onebit,mos2,mos4,mos8 at 2 M tokens (GPUs 2,3)
#   bash benchmarks/quality_study.sh levers       # paper recipe and one lever at a time, 2 M tokens (GPU 0)
#   bash benchmarks/quality_study.sh gputests     # training's GPU tests, into $OUT/gputests.txt (~1 minute)
#
# Budgets are minutes of the training loop (`train --max-minutes`: the schedule runs over that time;
# loading and evaluation are outside it); `binarymos eval` scores each saved model afterwards. A run
# that is stopped (SIGTERM) checkpoints, and the same command again resumes it.
#
# session: the machine's GPU time for one call is 10 minutes, so the session runs detached (setsid)
# while `poll` calls keep the machine: GPU 3 trains E=4 for 20 minutes; GPUs 0-2 first compare batch
# sizes at SWEEP_MINUTES (default 3.5), then train E=4, E=1 and the paper recipe for 10 minutes each
# (LONG_MINUTES and SHORT_MINUTES change the 20 and the 10)
# at the batch that won, then GPUs 1-2 run the 2-GPU scaling benchmark at batch 8 and GPU 0 times
# teacher sampling. Work files in $W; results packed into $OUT/quality-<step>.tar.gz.
#
# session gemma (one GPU): the second architecture ($G, Gemma-3-270M), E=4 then E=1 for SHORT_MINUTES
# (10) each at batch 8 (SHARE_GPU=1: both at once), its full-precision teacher evaluated meanwhile. EVAL_WINDOWS
# limits every evaluation to its first windows per set; GEMMA_TRAIN_ARGS are added to both runs' options.
# Gemma GGUFs need transformers >= 5.23 (the device image has 5.17): benchmarks/device_site.sh installs it.
# session bf16 (one GPU): E=4 at batch 8 for BF16_MINUTES (6) each, one after the other: as by default,
# with --bf16-compute, and with --bf16-compute --compile.
set -uo pipefail
STEP=${1:?session, poll, budget, probe, compare or levers}
M=${M:-/tmp/smollm2.gguf}
G=${G:-/tmp/gemma.gguf}
W=${W:-/tmp/quality}
OUT=${OUT:-$W/out}
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
mkdir -p "$W" "$OUT"
BM="python -m binarymos.cli"
TRAIN="$BM train --model $M --data c4_wiki -E 4 --log-every 10 --save-every 1000000000"
rate() {  # tokens/s of a run's log between its 10th logged step and its last
    python - "$1" <<'EOF'
import sys
from binarymos.train import read_log
log = read_log(sys.argv[1])
a, b = log[min(10, len(log) - 2)], log[-1]
print(int((b["tokens"] - a["tokens"]) / (b["time"] - a["time"])))
EOF
}
trained() {  # GPU NAME [train options, a budget among them]: train (or resume), then evaluate, and write
    # $run/analyze/analyze.json (the experts' spread per layer, three layers' gates; no matplotlib needed)
    local gpu=$1 run=$W/$2
    shift 2
    if [ ! -d "$run/model" ]; then
        local resume=
        [ -f "$run/checkpoint.pt" ] && resume=--resume
        CUDA_VISIBLE_DEVICES=$gpu $TRAIN --out "$run" $resume "$@" >> "$run.log" 2>&1
    fi
    if [ -d "$run/model" ] && [ ! -f "$run/eval.json" ]; then
        CUDA_VISIBLE_DEVICES=$gpu $BM eval --model "$run/model" --ppl wikitext2,c4 --json "$run/eval.json" \
            ${EVAL_WINDOWS:+--eval-windows $EVAL_WINDOWS} > "$run-eval.log" 2>&1
    fi
    if [ -d "$run/model" ] && [ ! -f "$run/analyze/analyze.json" ]; then
        CUDA_VISIBLE_DEVICES=$gpu $BM analyze "$run" --out "$run/analyze" --no-plots > "$run-analyze.log" 2>&1
    fi
}
timed_run() {  # GPU NAME MINUTES [train options]: train (or resume) for MINUTES, then evaluate
    local gpu=$1 name=$2 minutes=$3
    shift 3
    trained "$gpu" "$name" --max-minutes "$minutes" "$@"
}
best_batch() {  # the options of the sweep run with the lowest WikiText-2 perplexity (batch 8 if none finished)
    python - "$W" <<'EOF'
import json, sys
from pathlib import Path
options = {"b4": "--batch-size 4 --no-grad-checkpointing", "b8": "--batch-size 8 --no-grad-checkpointing",
           "b16": "--batch-size 16 --grad-checkpointing"}
scores = {}
for name in options:
    path = Path(sys.argv[1]) / f"sweep-{name}" / "eval.json"
    if path.exists():
        scores[name] = next(iter(json.loads(path.read_text()).values()))["wikitext2"]
print(options[min(scores, key=scores.get)] if scores else options["b8"])
EOF
}
pack() {
    tar czf "$OUT/quality-$STEP.tar.gz" -C "$W" --exclude='*.pt' --exclude='model' --exclude='*.safetensors' \
        --exclude='checkpoint*' --exclude='*.tmp' --exclude=code --exclude=scaling-work . 2>/dev/null
}

case $STEP in
session)
    if [ -f "$W/done" ]; then  # a second session here would be taken for the first and never start
        echo "the session in $W has finished: give another W=... for a new one" >&2
        exit 1
    fi
    if [ ! -f "$W/started" ]; then  # from a copy of the code: a later call may rewrite the checkout
        touch "$W/started"
        rm -rf "$W/code" && mkdir -p "$W/code" && cp -r src benchmarks "$W/code/"
        PYTHONPATH="$W/code/src:${PYTHONPATH:-}" setsid nohup bash "$W/code/benchmarks/quality_study.sh" \
            "lanes${2:+-$2}" \
            > "$W/session.log" 2>&1 < /dev/null &
    fi
    echo "session running: $(cat "$W/session.log" 2>/dev/null | tail -n 3)"
    ;;
lanes)  # what `session` runs detached
    python -c "from binarymos.models import loadable; loadable('$M')"  # the .gguf converted once, not per run
    LONG=${LONG_MINUTES:-20} SHORT=${SHORT_MINUTES:-10}
    timed_run 3 e4-${LONG}min "$LONG" --batch-size 8 --no-grad-checkpointing &
    (
        S=${SWEEP_MINUTES:-3.5}
        timed_run 0 sweep-b4 "$S" --batch-size 4 --no-grad-checkpointing &
        timed_run 1 sweep-b8 "$S" --batch-size 8 --no-grad-checkpointing &
        timed_run 2 sweep-b16 "$S" --batch-size 16 --grad-checkpointing &
        wait
        BEST=$(best_batch)
        echo "best batch: $BEST" > "$W/best.txt"
        timed_run 0 e4-${SHORT}min "$SHORT" $BEST &
        timed_run 1 e1-${SHORT}min "$SHORT" $BEST -E 1 &
        timed_run 2 paper-${SHORT}min "$SHORT" $BEST --recipe paper &
        wait
        CUDA_VISIBLE_DEVICES=1,2 BINARYMOS_BENCH_WORK=$W/scaling-work python "$(dirname "$0")/scaling.py" --model "$M" \
            --only smollm2 --steps 30 --out "$W/scaling-b8" \
            --config-extra '{"batch_size": 8, "grad_checkpointing": false}' > "$W/scaling-b8.log" 2>&1 &
        CUDA_VISIBLE_DEVICES=0 python - "$M" > "$W/teacher-sampling.txt" 2>&1 <<'EOF' &
import sys, time, torch
from binarymos.models import load_model
from binarymos.synth import sample
model, tokenizer = load_model(sys.argv[1], dtype=torch.bfloat16, device="cuda")
for batch in (64, 256):
    torch.cuda.synchronize(); t = time.perf_counter()
    ids = sample(model, tokenizer, batch, 2048, 1.0, 0, batch)
    torch.cuda.synchronize(); s = time.perf_counter() - t
    print(f"teacher sampling, batch {batch} x 2048 tokens: {s:.1f} s, {ids.numel() / s:,.0f} tokens/s")
EOF
        wait
    ) &
    wait
    touch "$W/done"
    ;;
lanes-gemma)  # what `session gemma` runs detached: E=4 and E=1 side by side, on GPUs 0 and 1 where there are
    # two; on one GPU one after the other, or both at once with SHARE_GPU=1
    SHORT=${SHORT_MINUTES:-10}
    python -c "import transformers; print('transformers', transformers.__version__)"
    python -c "from binarymos.models import loadable; loadable('$G')"
    CUDA_VISIBLE_DEVICES=0 $BM eval --model "$G" --ppl wikitext2,c4 --json "$W/gemma-fp.json" \
        ${EVAL_WINDOWS:+--eval-windows $EVAL_WINDOWS} > "$W/gemma-fp.log" 2>&1 &  # alongside the students' start
    SECOND=0
    [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && SECOND=1
    timed_run 0 gemma-e4-${SHORT}min "$SHORT" --model "$G" --batch-size 8 ${GEMMA_TRAIN_ARGS:-} &
    [ "$SECOND" = 1 ] || [ -n "${SHARE_GPU:-}" ] || wait
    timed_run $SECOND gemma-e1-${SHORT}min "$SHORT" --model "$G" --batch-size 8 -E 1 ${GEMMA_TRAIN_ARGS:-} &
    wait
    touch "$W/done"
    ;;
lanes-x2)  # what `session x2` runs detached: issue 6's planner check on new configurations and the noise floor
    python -c "from binarymos.models import loadable; loadable('$M')"
    CUDA_VISIBLE_DEVICES=0,1 BINARYMOS_BENCH_WORK=$W/scaling-work python "$(dirname "$0")/scaling.py" --model "$M" \
        --steps 30 --only noise,planner --out "$W/scaling-check" \
        --config-extra '{"batch_size": 8, "grad_checkpointing": false}' > "$W/scaling-check.log" 2>&1
    touch "$W/done"
    ;;
lanes-bf16)  # what `session bf16` runs detached, on one GPU
    BF=${BF16_MINUTES:-6}
    python -c "from binarymos.models import loadable; loadable('$M')"
    timed_run 0 e4-fp32-${BF}min "$BF" --batch-size 8 --no-grad-checkpointing
    timed_run 0 e4-bf16-${BF}min "$BF" --batch-size 8 --no-grad-checkpointing --bf16-compute
    timed_run 0 e4-bf16-compile-${BF}min "$BF" --batch-size 8 --no-grad-checkpointing --bf16-compute --compile --blockwise 0
    touch "$W/done"
    ;;
lanes-throughput)  # what `session throughput` runs detached, on one GPU: sampling with each KV cache, then training
    # tokens/s with each part compiled (E=4), and the eager and teacher+loss variants at E=1
    python -c "from binarymos.models import loadable; loadable('$M')"
    B=$(dirname "$0")
    python "$B/sampling_speed.py" --model "$M" --caches dynamic,graph --seq-len 512 --out "$W/sampling-512.md" \
        > "$W/sampling-512.log" 2>&1
    python "$B/sampling_speed.py" --model "$M" --caches graph --seq-len 2048 --out "$W/sampling-2048.md" \
        > "$W/sampling-2048.log" 2>&1
    python "$B/train_throughput.py" --model "$M" --experts 4 --out "$W/throughput-e4.md" > "$W/throughput-e4.log" 2>&1
    python "$B/train_throughput.py" --model "$M" --experts 1 --variants eager,teacher+loss \
        --out "$W/throughput-e1.md" > "$W/throughput-e1.log" 2>&1
    touch "$W/done"
    ;;
lanes-teacher)  # what `session teacher` runs detached, on one GPU: teacher sampling with each KV cache, then E=4 for
    # SHORT_MINUTES (10) with --bf16-compute --compile teacher, for each of RUNS: "real" (c4_wiki) and "teacher"
    # (c4_wiki and TEACHER_SAMPLES (2048) sequences the teacher wrote, sampled before the budget's clock starts)
    SHORT=${SHORT_MINUTES:-10} N=${TEACHER_SAMPLES:-2048}
    python -c "from binarymos.models import loadable; loadable('$M')"
    B=$(dirname "$0")
    [ -f "$W/sampling-512.md" ] || python "$B/sampling_speed.py" --model "$M" --caches dynamic,graph --seq-len 512 \
        --out "$W/sampling-512.md" > "$W/sampling-512.log" 2>&1
    FAST="--batch-size 8 --no-grad-checkpointing --bf16-compute --compile teacher --blockwise 0"
    for run in ${RUNS:-real teacher}; do
        case $run in
        real) timed_run 0 e4-bf16-teacher-compiled-${SHORT}min "$SHORT" $FAST ;;
        teacher) timed_run 0 e4-teacher-text-${N}-${SHORT}min "$SHORT" $FAST --data teacher+c4_wiki \
            --teacher-samples "$N" --teacher-batch-size 256 ;;
        esac
    done
    touch "$W/done"
    ;;
lanes-ab)  # what `session ab` runs detached, on one GPU: whether graph sampling writes what the eager static cache
    # writes (temperature 0), then the teacher's TEACHER_SAMPLES (512) sequences sampled into the cache, then two E=4
    # runs of SHORT_MINUTES (10) sharing the GPU from the same moment: c4_wiki, and c4_wiki plus the teacher's text
    SHORT=${SHORT_MINUTES:-10} N=${TEACHER_SAMPLES:-512}
    python -c "from binarymos.models import loadable; loadable('$M')"
    B=$(dirname "$0")
    python "$B/sampling_speed.py" --model "$M" --caches static,graph --seq-len 128 --count 64 --batch-size 64 \
        --temperature 0 --out "$W/sampling-check.md" > "$W/sampling-check.log" 2>&1
    python - "$M" "$N" > "$W/teacher-text.log" 2>&1 <<'EOF'
import sys, time, torch
from binarymos.models import load_model
from binarymos.synth import teacher_tokens
model, tokenizer = load_model(sys.argv[1], dtype=torch.bfloat16, device="cuda")
t = time.perf_counter()
ids = teacher_tokens(model, tokenizer, sys.argv[1], int(sys.argv[2]), 2048, 1.0, 0, 256)
print(f"teacher text: {ids.numel():,} tokens in {time.perf_counter() - t:.1f} s")
EOF
    FAST="--batch-size 8 --no-grad-checkpointing --bf16-compute --compile teacher --blockwise 0"
    timed_run 0 ab-real-${SHORT}min "$SHORT" $FAST &
    timed_run 0 ab-teacher-${N}-${SHORT}min "$SHORT" $FAST --data teacher+c4_wiki --teacher-samples "$N" \
        --teacher-batch-size 256 &
    wait
    touch "$W/done"
    ;;
lanes-fused)  # what `session fused` runs detached, on one GPU: PROBES (default all), then RUNS (none by default).
    # Probes: "layer" the fused training layer's accuracy and time per layer; "b8" tokens/s against the plain autograd
    # layer at batch 8, E=4 and E=1; "graphs" E=4 with the teacher in CUDA graphs; "b16" E=4 and E=1
    # at batch 16 without checkpointing. Runs ("e4", "e1"): SHORT_MINUTES (10) at batch BATCH (8), --bf16-compute
    SHORT=${SHORT_MINUTES:-10} BATCH=${BATCH:-8}
    python -c "from binarymos.models import loadable; loadable('$M')"
    B=$(dirname "$0")
    for probe in ${PROBES:-layer b8 graphs b16}; do
        case $probe in
        layer) python "$B/training_layer.py" --out "$W/training-layer.md" > "$W/training-layer.log" 2>&1 ;;
        b8) python "$B/train_throughput.py" --model "$M" --experts 4,1 --variants formula,eager \
                --out "$W/throughput-b8.md" > "$W/throughput-b8.log" 2>&1 ;;
        graphs) timeout 420 python "$B/train_throughput.py" --model "$M" --experts 4 --variants teacher-graphs \
                --out "$W/throughput-b8-teacher-graphs.md" > "$W/throughput-b8-teacher-graphs.log" 2>&1 ;;
        b16) python "$B/train_throughput.py" --model "$M" --experts 4,1 --variants eager --batch-size 16 \
                --out "$W/throughput-b16.md" > "$W/throughput-b16.log" 2>&1 ;;
        esac
    done
    FAST="--batch-size $BATCH --no-grad-checkpointing --bf16-compute"
    for run in ${RUNS:-}; do
        case $run in
        e4) timed_run 0 fused-e4-b$BATCH-${SHORT}min "$SHORT" $FAST ;;
        e1) timed_run 0 e1-b$BATCH-${SHORT}min "$SHORT" $FAST -E 1 ;;
        esac
    done
    touch "$W/done"
    ;;
lanes-study9)  # what `session study9` runs detached, on two GPUs: six E=4 recipes at TOKENS (10 M) each, three at a
    # time on each GPU (equal tokens, so sharing a GPU favours none), each evaluated on its first EVAL_WINDOWS (40)
    # windows per set; then the KL to the teacher on training and on held-out text of the real-text run and the
    # first teacher-text run. GPU 0 first samples the teacher's continuations of real text (cached for its runs).
    TOKENS=${TOKENS:-10000000}
    export EVAL_WINDOWS=${EVAL_WINDOWS:-40}
    python -c "from binarymos.models import loadable; loadable('$M')"
    RUN="--max-tokens $TOKENS --batch-size 8 --no-grad-checkpointing --bf16-compute"
    TEXT="--data teacher+c4_wiki --teacher-seq-len 256 --teacher-prompt-len 32 --teacher-batch-size 2048"
    trained 1 real $RUN --blockwise 0 &  # the default recipe before session 9
    trained 1 blockwise $RUN --blockwise 0.25 &
    trained 1 kl-only $RUN --hidden-weight 0 --blockwise 0 &
    (
        for n in 16384 4096; do
            CUDA_VISIBLE_DEVICES=0 python - "$M" "$n" >> "$W/teacher-text.log" 2>&1 <<'EOF'
import sys, time
from binarymos.train import TrainConfig, prepare
t = time.perf_counter()
blocks = prepare(TrainConfig(model=sys.argv[1], data="teacher+c4_wiki", teacher_samples=int(sys.argv[2]),
                             teacher_seq_len=256, teacher_prompt_len=32, teacher_batch_size=2048))[3]
print(f"{sys.argv[2]} continuations of 32 real tokens to 256: {len(blocks)} blocks, {time.perf_counter() - t:.1f} s "
      "with loading and binarizing")
EOF
        done
        trained 0 text16k $RUN $TEXT --teacher-samples 16384 --blockwise 0 &
        trained 0 text4k $RUN $TEXT --teacher-samples 4096 --blockwise 0 &
        trained 0 text16k-blockwise $RUN $TEXT --teacher-samples 16384 --blockwise 0.25 &
        wait
    ) &
    wait
    CUDA_VISIBLE_DEVICES=1 python "$(dirname "$0")/heldout_kl.py" --teacher "$M" --windows 16 \
        --students "$W/real/model,$W/text16k/model" --out "$W/heldout-kl.md" > "$W/heldout-kl.log" 2>&1
    touch "$W/done"
    ;;
lanes-alone)  # what `session alone` runs detached, on GPU 0: each NAME:BUDGET of RUNS (default "e4:20") alone on the
    # GPU, one after the other, so that their tokens per minute are their own. BUDGET is minutes of training, or
    # millions of tokens with an M (10M: comparable across machines of different speed). NAME e4 is the default
    # recipe at E=4, eN (e1, e2, e8, e16) at that E, paper the authors' recipe at E=4, and one lever each at E=4: bN
    # batch N (b16, b4; after seqN it sets that run's batch), seqN sequences of N tokens (seq1024: 16 of them a step,
    # the same 16,384 tokens), bwN --blockwise N/100 (bw12: the first 12 %), lr2 and lr05 both learning rates doubled
    # and halved, hidN --hidden-weight N (the default's is 3 since session 25; hid1 the one before), norms
    # --train-norms, alltext all the offline real text (c4_wiki and calib: 1.32 M tokens, 2.1x c4_wiki's), graphs
    # the default recipe with each step replayed as a CUDA graph (--cuda-graphs), cache the teacher's outputs computed
    # once before the first step (--cache-teacher), anneal10 and anneal25
    # --blockwise-anneal 0.1 and 0.25 (each block's input handed from the teacher's to its own over that share of
    # the budget after the block-wise quarter), xnoiseN --expert-init-noise N/100 (the experts' initial scales
    # spread by N %, where the paper starts them equal), teachN all the real text and N sequences the teacher
    # wrote, 256 at once (sampled before the clock starts and cached on disk: not in the run's budget; 1.05 M
    # tokens in 274 s in session 7); gemma the second architecture ($G: Gemma-3-270M, transformers >= 5.23) instead of $M;
    # NAME may join several with +
    # (graphs+e1: E=1 with CUDA graphs); batch 8,
    # no checkpointing, --bf16-compute, plus $TRAIN_ARGS (EVAL_WINDOWS shortens the evaluations of screening runs)
    python -c "from binarymos.models import loadable; loadable('$M')"
    for run in ${RUNS:-e4:20}; do
        name=${run%%:*} budget=${run##*:}
        case $budget in
        *M) [[ ${budget%M} =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "bad budget $budget in $run" >&2; continue; }
            budget_args="--max-tokens $(awk "BEGIN { printf \"%.0f\", ${budget%M} * 1000000 }")" label=${budget}tok ;;
        *) budget_args="--max-minutes $budget" label=${budget}min ;;
        esac
        extra= unknown=
        for part in ${name//+/ }; do  # levers joined by +, e.g. graphs+e1
            case $part in
            e4) ;;
            e[0-9]*) extra+=" -E ${part#e}" ;;
            paper) extra+=" --recipe paper" ;;
            b[0-9]*) extra+=" --batch-size ${part#b}" ;;
            seq[0-9]*) extra+=" --seq-len ${part#seq} --batch-size $((8 * 2048 / ${part#seq}))" ;;
            bw[0-9]*) extra+=" --blockwise $(awk "BEGIN { print ${part#bw} / 100 }")" ;;
            lr2) extra+=" --lr-weight 4e-4 --lr-scale 2e-2" ;;
            lr05) extra+=" --lr-weight 1e-4 --lr-scale 5e-3" ;;
            hid[0-9]*) extra+=" --hidden-weight ${part#hid}" ;;
            norms) extra+=" --train-norms" ;;
            alltext) extra+=" --data c4_wiki,calib" ;;
            teach[0-9]*) extra+=" --data teacher+c4_wiki,calib --teacher-samples ${part#teach} --teacher-batch-size 256" ;;
            graphs) extra+=" --cuda-graphs" ;;
            cache) extra+=" --cache-teacher" ;;
            anneal10 | anneal25) extra+=" --blockwise-anneal 0.${part#anneal}" ;;
            xnoise[0-9]*) extra+=" --expert-init-noise $(awk "BEGIN { print ${part#xnoise} / 100 }")" ;;
            gemma) extra+=" --model $G" ;;
            *) unknown=$part ;;
            esac
        done
        [ -n "$unknown" ] && { echo "unknown run $unknown in $run" >&2; continue; }
        trained 0 "alone-$name-$label" $budget_args --batch-size 8 --no-grad-checkpointing --bf16-compute \
            $extra ${TRAIN_ARGS:-}
    done
    touch "$W/done"
    ;;
poll)
    SECONDS_MAX=${2:-560}
    for ((i = 0; i < SECONDS_MAX / 20; i++)); do
        [ -f "$W/done" ] && break
        sleep 20
    done
    [ -f "$W/done" ] && echo "session done" || echo "session still running"
    cat "$W/best.txt" 2>/dev/null
    for log in "$W"/*/log.jsonl; do
        [ -f "$log" ] && echo "$(basename "$(dirname "$log")"): $(tail -n 1 "$log")"
    done
    for e in "$W"/*/eval.json; do [ -f "$e" ] && echo "$(basename "$(dirname "$e")"): $(cat "$e")"; done
    for e in "$W"/*.json; do [ -f "$e" ] && echo "$(basename "$e"): $(cat "$e")"; done
    for e in "$W"/*.md; do [ -f "$e" ] && echo "$(basename "$e"):" && cat "$e"; done
    for log in "$W"/*.log; do  # the last line of each, progress bars' carriage returns taken as line ends
        [ -f "$log" ] && echo "$(basename "$log"): $(tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -n 1)"
    done
    ;;
budget)
    MINUTES=${2:?minutes of training}
    timed_run "${3:-0}" "budget-${MINUTES}min" "$MINUTES" ${TRAIN_ARGS:-}
    cat "$W/budget-${MINUTES}min/eval.json" 2>/dev/null
    tail -n 1 "$W/budget-${MINUTES}min/log.jsonl"
    ;;
probe)
    P="$TRAIN --max-steps 60 --log-every 1"
    CUDA_VISIBLE_DEVICES=0 $P --out "$W/probe-ckpt" --batch-size 2 --grad-checkpointing > "$W/probe-ckpt.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 $P --out "$W/probe-nockpt" --batch-size 2 --no-grad-checkpointing > "$W/probe-nockpt.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=2 $P --out "$W/probe-b4" --batch-size 4 --no-grad-checkpointing > "$W/probe-b4.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=3 $P --out "$W/probe-compile" --batch-size 2 --no-grad-checkpointing --compile --blockwise 0 \
        > "$W/probe-compile.log" 2>&1 &
    wait
    for r in ckpt nockpt b4 compile; do echo "probe-$r $(rate "$W/probe-$r" || echo failed)"; done | tee "$W/probe.txt"
    ;;
compare)
    $BM compare --model $M --methods fp,sign,onebit,mos2,mos4,mos8 --max-tokens 2000000 --data c4_wiki \
        --gpus 2,3 --parallel 6 --threads 4 --deadline 530 --out "$W/cmp2M" > "$W/cmp2M.log" 2>&1
    cat "$W/cmp2M/compare.md"
    ;;
gputests)  # training's GPU tests (CUDA graphs, the teacher cache, the KL kernel, the training layer; ~1 minute)
    : "${BINARYMOS_DATA_DIR:?the tests read the copied text there (the device has no ../shared/data)}"
    python -m pytest -q tests/test_train.py tests/test_nn.py -k "cuda_graphs or teacher_cache or on_the_gpu" 2>&1 \
        | tail -n 15 \
        | tee "$OUT/gputests.txt"
    ;;
levers)
    python benchmarks/recipe_sweep.py --model $M --variants "${LEVERS:-paper,teacher,norms,clip2,lr4e-4}" \
        --gpus 0 --parallel 6 --threads 4 --deadline 480 --out "$W/levers" > "$W/levers.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 60 $BM analyze "$W/levers/paper" --out "$W/pictures" > "$W/analyze.log" 2>&1
    cat "$W/levers/compare.md"
    ;;
esac
case $STEP in lanes | session | gputests) ;; *) pack ;; esac
