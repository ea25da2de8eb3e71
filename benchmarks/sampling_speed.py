"""Tokens/s of teacher sampling (binarymos.synth.sample) with each KV cache, and whether they write the same text.

    python benchmarks/sampling_speed.py --model /tmp/smollm2.gguf --out $OUT/sampling.md

For every --caches entry the teacher (bf16 on the GPU, as training samples it) writes --count sequences of
--seq-len tokens at --batch-size; the table gives tokens/s and, against the first cache's sequences, the share of
sequences that are identical and the mean position of the first difference (bf16 rounding differs between the
caches' attention kernels, so sampled text may part after a while even at temperature 0).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from binarymos.models import load_model
from binarymos.synth import sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--caches", default="dynamic,graph")
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model, tokenizer = load_model(args.model, dtype=torch.bfloat16, device="cuda")
    lines = [f"{torch.cuda.get_device_name()}, {args.model}, {args.count} x {args.seq_len} tokens, batch "
             f"{args.batch_size}, temperature {args.temperature}", "",
             "| cache | seconds | tokens/s | sequences equal to the first cache's | mean first difference |",
             "|---|---:|---:|---:|---:|"]
    first = None
    for cache in args.caches.split(","):
        torch.cuda.synchronize()
        started = time.perf_counter()
        ids = sample(model, tokenizer, args.count, args.seq_len, args.temperature, seed=0,
                     batch_size=args.batch_size, cache=cache)
        seconds = time.perf_counter() - started
        if first is None:
            first = ids
        differs = ids != first
        first_diff = torch.where(differs.any(1), differs.float().argmax(1), torch.tensor(args.seq_len)).float()
        lines.append(f"| {cache} | {seconds:.1f} | {ids.numel() / seconds:,.0f} | "
                     f"{(~differs.any(1)).float().mean():.0%} | {first_diff.mean():.0f} |")
        print(lines[-1], flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
