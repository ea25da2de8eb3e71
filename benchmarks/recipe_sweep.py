"""Train several recipe variants side by side (one process each, on one GPU) at one token budget
and tabulate WikiText-2 / C4 perplexity by the field's protocol.

    python benchmarks/recipe_sweep.py --variants paper,quick,default --max-tokens 2000000 --out runs/sweep

Each variant is a list of `binarymos train` options (VARIANTS below); every run shares the model,
data, seed, budget and evaluation. The runner is `binarymos compare`'s (binarymos.compare.study):
results go to OUT/compare.json and OUT/compare.md.
"""
from __future__ import annotations

import argparse
import shlex

import torch

from binarymos.compare import study, table
from binarymos.footprint import load_config

VARIANTS = {
    # the authors' setting: KL batchmean, lambda 10 unnormalised MSE, lr 2e-5
    "paper": ["--recipe", "paper"],
    # the "quick untuned variant": lr 5e-4 everywhere, per-token KL, normalised per-layer MSE
    "quick": ["--lr-weight", "5e-4", "--lr-scale", "5e-4", "--hidden-weight", "1"],
    "default": [],
    "w5e-5_s1e-3": ["--lr-weight", "5e-5", "--lr-scale", "1e-3"],
    "w2e-4_s2e-3": ["--lr-weight", "2e-4", "--lr-scale", "2e-3"],
    "w1e-4_s5e-3": ["--lr-weight", "1e-4", "--lr-scale", "5e-3"],
    "w1e-4_s1e-3_kl": ["--lr-weight", "1e-4", "--lr-scale", "1e-3", "--hidden-weight", "0"],
    "w1e-4_s1e-3_h10": ["--lr-weight", "1e-4", "--lr-scale", "1e-3", "--hidden-weight", "10"],
    "w1e-4_s1e-3_seq512": ["--lr-weight", "1e-4", "--lr-scale", "1e-3", "--seq-len", "512", "--batch-size", "16"],
    "w3e-5_s3e-3": ["--lr-weight", "3e-5", "--lr-scale", "3e-3"],
    "w1e-5_s1e-3": ["--lr-weight", "1e-5", "--lr-scale", "1e-3"],
    "w0_s3e-3": ["--lr-weight", "0", "--lr-scale", "3e-3"],
    "w0_s5e-3": ["--lr-weight", "0", "--lr-scale", "5e-3"],
    "w1e-4_s1e-2": ["--lr-weight", "1e-4", "--lr-scale", "1e-2"],
    "w1e-4_s5e-3_kl": ["--lr-weight", "1e-4", "--lr-scale", "5e-3", "--hidden-weight", "0"],
    "w1e-4_s5e-3_b2": ["--lr-weight", "1e-4", "--lr-scale", "5e-3", "--batch-size", "2"],
    "w1e-4_s1e-2_b2": ["--lr-weight", "1e-4", "--lr-scale", "1e-2", "--batch-size", "2"],
    "w1e-4_s2e-2_b2": ["--lr-weight", "1e-4", "--lr-scale", "2e-2", "--batch-size", "2"],
    "w2e-4_s1e-2_b2": ["--lr-weight", "2e-4", "--lr-scale", "1e-2", "--batch-size", "2"],
    # issue 5's levers, each alone against "default"
    "teacher": ["--data", "teacher+c4_wiki", "--teacher-samples", "512", "--teacher-batch-size", "256"],
    "norms": ["--train-norms"],
    "clip2": ["--ste-clip", "2"],
    "router0.2": ["--router-init-std", "0.2"],
    "lr4e-4": ["--lr-weight", "4e-4"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="paper,quick,default")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="c4_wiki")
    ap.add_argument("--num-experts", default="4")
    ap.add_argument("--max-tokens", default="2000000")
    ap.add_argument("--ppl", default="wikitext2,c4")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=3, help="OMP threads per process")
    ap.add_argument("--gpus", default="", help="GPU ids to spread the runs over, e.g. 0,1,2,3")
    ap.add_argument("--baselines", action="store_true", help="also evaluate full precision")
    ap.add_argument("--train-extra", default="", help="options added to every training run")
    ap.add_argument("--eval-extra", default="", help="options added to every evaluation")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds; runs still going then are killed")
    ap.add_argument("--out", default="runs/sweep")
    args = ap.parse_args()
    runs = {n: VARIANTS[n] for n in args.variants.split(",")}
    if args.baselines:
        runs["fp"] = "fp"
    load_config(args.model, builtin=False)  # converts a .gguf once, not in every run
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_args = ["--data", args.data, "--num-experts", args.num_experts, "--max-tokens", args.max_tokens]
    report = study(runs, args.model, train_args + shlex.split(args.train_extra),
                   ["--ppl", args.ppl] + shlex.split(args.eval_extra), args.out, args.ppl.split(","), device,
                   args.parallel, args.threads, [g for g in args.gpus.split(",") if g], args.deadline)
    print(table(report))


if __name__ == "__main__":
    main()
