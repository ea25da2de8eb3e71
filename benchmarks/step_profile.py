"""Where one distillation step's time and memory go on a GPU, and one step of teacher sampling.

    python benchmarks/step_profile.py --model /tmp/smollm2.gguf --out $OUT/profile

1. Peak memory (torch.cuda.max_memory_allocated) of a few steps at --batch with grad_accum 1 and 2,
   against binarymos.plan's estimate.
2. torch.profiler over 3 end-to-end steps (after 4 warm-up steps) of grad_accum 1: the top operators by CPU and
   by CUDA time, and the step's wall time against its summed GPU kernel time (host-bound or not);
   --bf16-compute, --cuda-graphs and --cache-teacher as in train (with graphs the kernels' time is what is left to win).
3. The same for 16 decoding steps of teacher sampling (binarymos.synth.sample's loop; --no-sampling skips it).
Writes OUT/profile.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def train_run(model: str, out: Path, batch: int, accum: int, steps: int, **options) -> float:
    from binarymos.train import TrainConfig, train

    torch.cuda.reset_peak_memory_stats()
    train(TrainConfig(model=model, data="c4_wiki", out=str(out), batch_size=batch, grad_accum=accum, max_steps=steps,
                      save_every=10**6, grad_checkpointing=False, num_experts=4, **options))
    return torch.cuda.max_memory_allocated() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="bench/profile")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="part 1")
    ap.add_argument("--sampling", action=argparse.BooleanOptionalAction, default=True, help="part 3")
    ap.add_argument("--bf16-compute", action="store_true", help="part 2: train's --bf16-compute")
    ap.add_argument("--cuda-graphs", action="store_true", help="part 2: train's --cuda-graphs")
    ap.add_argument("--cache-teacher", action="store_true", help="part 2: train's --cache-teacher")
    args = ap.parse_args()
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    from binarymos.footprint import load_config
    from binarymos.plan import count, estimate
    from binarymos.train import GraphedStep

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Step profile", ""]
    planned = estimate(count(load_config(args.model), 4), 1, 2048, args.batch)["total"] / 1e9
    for accum in (1, 2) if args.memory else ():
        peak = train_run(args.model, out / f"mem-accum{accum}", args.batch, accum, 4)
        lines.append(f"- batch {args.batch}, grad_accum {accum}: peak {peak:.2f} GB, planned {planned:.2f} GB "
                     f"({(planned - peak) / peak:+.1%})")

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], acc_events=True,
                   schedule=schedule(wait=0, warmup=4, active=3, repeat=1))
    # the profiler's schedule advances once per update: AdamW's step, or with --cuda-graphs the replay of the captured
    # update (AdamW's step then runs only inside the capture, where nothing may synchronize)
    owner, name = (GraphedStep, "update") if args.cuda_graphs else (torch.optim.AdamW, "step")
    real_update = getattr(owner, name)
    stamps = []

    def update_and_profile(self, *a, **kw):
        result = real_update(self, *a, **kw)
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        prof.step()
        return result

    setattr(owner, name, update_and_profile)
    with prof:
        # 7 steps: the block-wise ones (0-1) and the end-to-end graph's capture (step 2) in the warm-up
        train_run(args.model, out / "profiled", args.batch, 1, 7, bf16_compute=args.bf16_compute,
                  cuda_graphs=args.cuda_graphs, cache_teacher=args.cache_teacher)
    setattr(owner, name, real_update)
    # the kernels' own time: an operator's self device time is its kernels' again, and annotations span idle time
    gpu_us = sum(e.self_device_time_total for e in prof.key_averages()
                 if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 3
    wall = (stamps[-1] - stamps[-4]) / 3
    setting = "".join(f", {name}" for name, on in (("--bf16-compute", args.bf16_compute),
                                                   ("--cuda-graphs", args.cuda_graphs),
                                                   ("--cache-teacher", args.cache_teacher)) if on)
    lines += ["", f"## Training step, batch {args.batch}{setting}: wall {wall * 1e3:.0f} ms per step, GPU kernels "
              f"{gpu_us / 1e3:.0f} ms per step", "", "```",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), "```", "", "```",
              prof.key_averages().table(sort_by="self_device_time_total", row_limit=40), "```"]
    if args.sampling:
        lines += sampling_profile(args.model)
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


def sampling_profile(model: str) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    from binarymos.models import load_model
    from binarymos.synth import sample

    teacher, tokenizer = load_model(model, dtype=torch.bfloat16, device="cuda")
    sample(teacher, tokenizer, 64, 8, 1.0, 0, 64)  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as sprof:
        torch.cuda.synchronize()
        t = time.perf_counter()
        sample(teacher, tokenizer, 64, 17, 1.0, 0, 64)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 16
    return ["", f"## Teacher sampling, batch 64: {wall * 1e3:.1f} ms per decoding step", "", "```",
            sprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), "```"]


if __name__ == "__main__":
    main()
