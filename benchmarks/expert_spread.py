"""How fast the experts move apart from the paper's equal start, with and without --expert-init-noise (issue 5).

    python benchmarks/expert_spread.py --noise 0,0.1 --steps 20,60 --out expert_spread.md

Trains SmolLM2-135M (E=4, the default recipe, c4_wiki) for each number of steps from scratch, then reports
``analyze.expert_spread`` over its binarized layers: per layer, the channels' std over the experts over the layer's
mean |scale| (0: all experts equal). Small by default (sequence 128, batch 2) so that it runs on a CPU in minutes.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from binarymos.analyze import expert_spread
from binarymos.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="c4_wiki")
    p.add_argument("--noise", default="0,0.1", help="comma-separated --expert-init-noise values")
    p.add_argument("--steps", default="20,60", help="comma-separated numbers of steps, each trained from scratch")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lines = [f"{args.model}, E=4, {args.data}, {args.batch_size} x {args.seq_len} tokens a step, {args.device}; "
             "expert spread over the binarized layers", "",
             "| --expert-init-noise | steps | mean | min | median | max | seconds |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for noise in (float(v) for v in args.noise.split(",")):
        for steps in (int(v) for v in args.steps.split(",")):
            start = time.time()
            with tempfile.TemporaryDirectory() as out:
                student = train(TrainConfig(model=args.model, data=args.data, num_experts=4, seq_len=args.seq_len,
                                            batch_size=args.batch_size, max_steps=steps, device=args.device,
                                            expert_init_noise=noise, out=out, save_every=10**9, log_every=10))
            v = sorted(expert_spread(student).values())
            lines.append(f"| {noise} | {steps} | {statistics.mean(v):.2e} | {v[0]:.2e} | {statistics.median(v):.2e} | "
                         f"{v[-1]:.2e} | {time.time() - start:.0f} |")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
