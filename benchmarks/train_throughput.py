"""Tokens/s of short training runs, one variant of what is compiled at a time (a GPU probe, issue 5).

    python benchmarks/train_throughput.py --model /tmp/smollm2.gguf --out $OUT/train_throughput.md
    python benchmarks/train_throughput.py --variants eager,teacher --experts 4,1

A whole-model ``--compile`` ran 1.87x the tokens/s of eager bf16 training after 5 minutes of compiling,
while compiling each decoder block gained 10 % (docs/RESULTS.md). This probe times the pieces outside the
student's blocks on their own:

- ``eager``: nothing compiled;
- ``loss``: the chunked vocabulary KL (train._kl_sum, as ``chunked-kl``) and the per-layer hidden-state term
  (train.hidden_pair), compiled;
- ``teacher``: the frozen teacher's forward (no backward, one static shape);
- ``teacher+loss``: both;
- ``teacher-graphs``: the teacher compiled with CUDA graphs (mode "reduce-overhead");
- ``formula``: nothing compiled, and the student's BinaryMoS layers as plain autograd ops
  (``BinaryMoSLinear.formula_forward``) instead of the fused training layer (session 8);
- ``fused-adamw``: nothing compiled, and AdamW's fused update (one kernel for all parameters) instead of train's
  multi-tensor one, a candidate against the step's host overhead (binarymos.plan counts the multi-tensor update's
  temporary, so a switch needs its peak memory measured too);
- ``cuda-graphs``: nothing compiled, each step's forward and backward replayed as a CUDA graph (``--cuda-graphs``);
- ``cuda-graphs+fused-adamw``: both (with the host out of the forward and backward, the eager multi-tensor update is
  the time the GPU waits between replays);
- ``eager-update``, joined to ``cuda-graphs``: AdamW's update run eagerly between replays, as before
  ``GraphedStep.update`` captured it;
- ``chunked-kl``, joined to another: the vocabulary KL as autograd ops a chunk of tokens at a time, as before its
  Triton kernel (train.kl_sum's CPU path);
- ``cache`` and ``cuda-graphs+cache``: the teacher's outputs computed once before the first step and gathered from the
  GPU by each step (``--cache-teacher``; its seconds count in "seconds to step 10", not in the tokens/s).

Where ``eager`` ran first at the same E, each later variant's row also gives the largest relative difference of its
logged loss from eager's over the same steps (the same data, so a correct variant differs by rounding only).

Each runs --steps steps (bf16 compute unless --float32-residual, batch --batch-size x 2048, c4_wiki) and reports tokens/s after step --skip and
the seconds to step 10 (what compiling costs inside a time budget). Rows are written as they finish, to --out,
and every run's logged loss and KL per step beside it (the same name, .json).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from binarymos import train as train_mod
from binarymos.nn import BinaryMoSLinear
from binarymos.train import TrainConfig, train

# a variant is one of these or several joined by + (cuda-graphs+cache+fused-adamw); eager alone is nothing changed
PARTS = ("eager", "loss", "teacher", "teacher-graphs", "formula", "fused-adamw", "cuda-graphs", "eager-update",
         "chunked-kl", "cache")
DEFAULT_VARIANTS = ("eager", "loss", "teacher", "teacher+loss", "teacher-graphs", "formula", "fused-adamw",
                    "cuda-graphs", "cuda-graphs+fused-adamw", "cache", "cuda-graphs+cache", "cuda-graphs+chunked-kl",
                    "cuda-graphs+cache+eager-update")


def _patch(parts: list[str]) -> dict:
    """Monkeypatch train's loss pieces, prepare() and AdamW for a variant's ``parts``; returns what to restore."""
    saved = {name: getattr(train_mod, name) for name in ("_kl_sum", "hidden_pair", "prepare", "triton_available")}
    if "eager-update" in parts:
        train_mod.GraphedStep.update = lambda step: step.optimizer.step()
    if "chunked-kl" in parts or "loss" in parts:
        train_mod.triton_available = lambda: False  # kl_sum's only use of it
    if "fused-adamw" in parts:
        adamw = torch.optim.AdamW
        torch.optim.AdamW = lambda groups, **options: adamw(groups, **options, fused=True)
    if "formula" in parts:
        BinaryMoSLinear.forward = BinaryMoSLinear.formula_forward
    if "loss" in parts:
        train_mod._kl_sum, train_mod.hidden_pair = torch.compile(saved["_kl_sum"]), torch.compile(saved["hidden_pair"])
    if "teacher" in parts or "teacher-graphs" in parts:
        mode = "reduce-overhead" if "teacher-graphs" in parts else None

        def prepare(cfg, env=None):
            teacher, student, tokenizer, blocks = saved["prepare"](cfg, env)
            teacher.compile(mode=mode)
            return teacher, student, tokenizer, blocks

        train_mod.prepare = prepare
    return saved


def run(model: str, steps: int, skip: int, variant: str, experts: int, batch: int, bf16: bool) -> dict:
    fused_forward, adamw, update = BinaryMoSLinear.forward, torch.optim.AdamW, train_mod.GraphedStep.update
    parts = variant.split("+")
    saved = _patch(parts)
    torch._dynamo.reset()
    try:
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            train(TrainConfig(model=model, data="c4_wiki", out=out, num_experts=experts, batch_size=batch,
                              grad_checkpointing=False, bf16_compute=bf16, max_steps=steps, log_every=1,
                              save_every=10**6, cuda_graphs="cuda-graphs" in parts, cache_teacher="cache" in parts))
            wall = time.perf_counter() - started
            log = train_mod.read_log(out)
    finally:
        BinaryMoSLinear.forward, torch.optim.AdamW, train_mod.GraphedStep.update = fused_forward, adamw, update
        for name, value in saved.items():
            setattr(train_mod, name, value)
    a, b = log[skip - 1], log[-1]
    return {"variant": variant, "experts": experts, "tokens_per_s": (b["tokens"] - a["tokens"]) / (b["time"] - a["time"]),
            "seconds_to_step_10": log[9]["train_seconds"], "final_kl": b["kl"], "wall_s": wall,
            "losses": [r["loss"] for r in log], "kls": [r["kl"] for r in log],
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated; each one of {', '.join(PARTS)} or several joined by +")
    p.add_argument("--experts", default="4", help="comma-separated; every variant runs at each")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--float32-residual", action="store_true", help="without --bf16-compute")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=20, help="steps left out of the tokens/s (compilation, warm-up)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    compute = "float32 residual stream" if args.float32_residual else "--bf16-compute"
    lines = [f"{device}, batch {args.batch_size} x 2048, {compute}, {args.steps} steps, "
             f"tokens/s after step {args.skip}", "",
             "| variant | E | tokens/s | seconds to step 10 | run wall s | peak GB | final KL | loss vs eager |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    results = []
    for experts in (int(e) for e in args.experts.split(",")):
        eager = None
        for variant in args.variants.split(","):
            unknown = set(variant.split("+")) - set(PARTS)
            if unknown:
                raise SystemExit(f"unknown part {', '.join(sorted(unknown))} in variant {variant!r}: use "
                                 f"{', '.join(PARTS)}, joined by +")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            r = run(args.model, args.steps, args.skip, variant, experts, args.batch_size, not args.float32_residual)
            eager = r["losses"] if variant == "eager" else eager
            differs = max(abs(a / b - 1) for a, b in zip(r["losses"], eager)) if eager and variant != "eager" else None
            lines.append(f"| {variant} | {experts} | {r['tokens_per_s']:,.0f} | {r['seconds_to_step_10']:.1f} | "
                         f"{r['wall_s']:.0f} | {r['peak_gb']:.1f} | {r['final_kl']:.3f} | "
                         f"{'' if differs is None else f'{differs:.1e}'} |")
            print(lines[-1], flush=True)
            results.append(r)
            if args.out:
                Path(args.out).write_text("\n".join(lines) + "\n")
                Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
