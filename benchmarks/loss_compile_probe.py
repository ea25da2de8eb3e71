"""Tokens/s of short training runs with the loss's float32 parts compiled or not (a GPU probe, issue 5).

    python benchmarks/loss_compile_probe.py --model /tmp/smollm2.gguf --out $OUT/loss_compile.md

A whole-model ``--compile`` ran 1.87x the tokens/s of eager bf16 training after 5 minutes of compiling,
while compiling each decoder block gained 10 % (docs/RESULTS.md): so the gain is outside the blocks. This
probe compiles only the loss's pieces, the chunked vocabulary KL (train._kl_sum) and the per-layer
hidden-state term (train.hidden_pair), and times --steps steps of each variant: tokens/s after step
--skip, and the seconds to step 10 (what compilation costs).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from binarymos import train as train_mod
from binarymos.train import TrainConfig, train


def run(model: str, steps: int, skip: int, compiled: bool, experts: int) -> dict:
    kl_sum, hidden_pair = train_mod._kl_sum, train_mod.hidden_pair
    if compiled:
        train_mod._kl_sum, train_mod.hidden_pair = torch.compile(kl_sum), torch.compile(hidden_pair)
    try:
        with tempfile.TemporaryDirectory() as out:
            train(TrainConfig(model=model, data="c4_wiki", out=out, num_experts=experts, batch_size=8,
                              grad_checkpointing=False, bf16_compute=True, max_steps=steps, log_every=1,
                              save_every=10**6))
            log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    finally:
        train_mod._kl_sum, train_mod.hidden_pair = kl_sum, hidden_pair
    a, b = log[skip - 1], log[-1]
    return {"tokens_per_s": (b["tokens"] - a["tokens"]) / (b["time"] - a["time"]),
            "seconds_to_step_10": log[9]["train_seconds"], "final_kl": b["kl"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=20, help="steps left out of the tokens/s (compilation, warm-up)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = {name: run(args.model, args.steps, args.skip, compiled, args.experts)
            for name, compiled in (("eager", False), ("loss compiled", True))}
    lines = [f"{torch.cuda.get_device_name()}, E={args.experts}, batch 8 x 2048, --bf16-compute, {args.steps} steps",
             "", "| variant | tokens/s after step %d | seconds to step 10 | final KL |" % args.skip, "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r['tokens_per_s']:,.0f} | {r['seconds_to_step_10']:.1f} | {r['final_kl']:.3f} |"
              for n, r in rows.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
