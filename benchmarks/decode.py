"""End-to-end greedy decoding: a packed BinaryMoS model against the same architecture in fp16.

Random weights (speed needs no trained ones) in a Hugging Face model built from a config on the
GPU; the packed variant swaps every linear layer of the decoder blocks for a PackedBinaryMoSLinear
(E = 4, or --experts) with random signs, router and scales; embeddings, norms and the LM head stay fp16. Both run
the same loop: the prompt through the model once, then one CUDA graph per generated token that
runs the model on the last token with a static KV cache, takes the argmax and feeds it back, all
on the device (no host synchronisation between tokens). Reports tokens/s and peak GPU memory.
With --compile both variants' forward goes through torch.compile first (the BinaryMoS layer is the
opaque custom op ``binarymos::binary_mos_linear``), which fuses the norms, rotary embedding, SiLU
and residual adds that otherwise cost a kernel launch each per layer. With --profile N, torch.profiler also
records N more replays of each graph and a second table splits a token's wall time into the kernels' time by
kind (ours, cuBLAS's, attention's, the rest) and the time the GPU ran no kernel: what is left to win, and where.

    PYTHONPATH=src python benchmarks/decode.py --out docs/decode.md [--compile] [--profile 16]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from binarymos.convert import decoder_blocks
from binarymos.models import kv_cache_keyword
from binarymos.nn import PackedBinaryMoSLinear

MODELS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
}

# kernel kinds by the names the profiler gives them, the first that matches: binarymos.kernels' Triton kernels
# (before cuBLAS's, whose GEMVs share a word with ours), cuBLAS's fp16 products, attention
KERNEL_KINDS = (
    ("binarymos", ("_gemv_kernel", "_decode_kernel", "_router_kernel", "_prep_kernel", "_unpack_kernel",
                   "_scale_output_kernel")),
    ("cublas", ("gemm", "gemv", "nvjet", "cutlass", "xmma")),
    ("attention", ("flash", "fmha", "attention", "attn")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


def kernel_ms_by_kind(kernels, steps: int) -> dict:
    """Per step, each kind's summed kernel milliseconds and the kernels launched, from (name, device us, calls)."""
    per_step = dict.fromkeys([kind for kind, _ in KERNEL_KINDS] + ["other"], 0.0)
    launches = 0
    for name, device_us, calls in kernels:
        per_step[kernel_kind(name)] += device_us / 1e3 / steps
        launches += calls
    return per_step | {"kernels": launches / steps}


def build_model(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**MODELS[name], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def pack_randomly(model: nn.Module, experts: int = 4) -> nn.Module:
    """Every nn.Linear of the decoder blocks -> PackedBinaryMoSLinear with random contents."""
    _, blocks = decoder_blocks(model)
    for block in blocks:
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            packed = PackedBinaryMoSLinear(module.in_features, module.out_features, experts, module.bias is not None,
                                           device="cuda", dtype=torch.float16)
            packed.packed_weight.random_(0, 256)
            packed.router.normal_(0, 0.05)
            packed.scale_in.uniform_(0.5, 1.5)
            packed.scale_out.uniform_(0.5, 1.5).div_(math.sqrt(module.in_features))
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, packed)
    return model


@torch.no_grad()
def decode(model, batch: int, prompt_len: int, new_tokens: int, compile: bool = False,
           profile_steps: int = 0) -> tuple[float, torch.Tensor, dict | None]:
    """Seconds for ``new_tokens`` greedy steps (CUDA-graph replays) after a prompt; the tokens; and with
    ``profile_steps``, kernel_ms_by_kind of that many more replays under torch.profiler."""
    from transformers import StaticCache

    warmup = 3
    steps = new_tokens + warmup + profile_steps
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + steps + 1)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device="cuda")
    cached = {kv_cache_keyword(model): cache}
    logits = model(input_ids=prompt, **cached, use_cache=True).logits
    last = logits[:, -1:].argmax(-1)
    tokens = torch.zeros(batch, steps, dtype=torch.long, device="cuda")
    step_index = torch.zeros(1, dtype=torch.long, device="cuda")
    position = torch.full((1,), prompt_len, dtype=torch.long, device="cuda")  # of the token being fed
    forward = torch.compile(model.forward, dynamic=False) if compile else model.forward

    def step():
        out = forward(input_ids=last, **cached, use_cache=True, cache_position=position).logits
        last.copy_(out[:, -1:].argmax(-1))
        tokens.index_copy_(1, step_index, last)
        step_index.add_(1)
        position.add_(1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup - 1):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()  # the last warm-up step
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(new_tokens):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, tokens[:, :new_tokens + warmup], profiled(graph, profile_steps)


def profiled(graph, steps: int) -> dict | None:
    if not steps:
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    return kernel_ms_by_kind([(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                              if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)],
                             steps)


def run(names, batches, prompt_len, new_tokens, compile=False, experts: int = 4,
        profile_steps: int = 0) -> list[dict]:
    rows = []
    for name in names:
        model = build_model(name)
        for variant in ("fp16", "binarymos"):
            if variant == "binarymos":
                pack_randomly(model, experts)
            gc.collect()
            torch.cuda.empty_cache()
            weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            for batch in batches:
                torch.cuda.reset_peak_memory_stats()
                seconds, tokens, kernel_ms = decode(model, batch, prompt_len, new_tokens, compile, profile_steps)
                row = {"model": name, "variant": variant, "batch": batch, "tok_s": batch * new_tokens / seconds,
                       "ms_per_step": 1e3 * seconds / new_tokens, "weights_gb": weights / 1e9,
                       "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                       "distinct_tokens": int(tokens.unique().numel()), "kernel_ms": kernel_ms}
                rows.append(row)
                print(f"{name:>13} {variant:>9} batch {batch}: {row['tok_s']:9.1f} tok/s "
                      f"({row['ms_per_step']:.2f} ms/step), weights {row['weights_gb']:.2f} GB, "
                      f"peak {row['peak_gb']:.2f} GB", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def markdown(rows, prompt_len, new_tokens, compile=False, experts: int = 4) -> str:
    lines = [f"Device: {torch.cuda.get_device_name()}; {datetime.date.today().isoformat()}; torch {torch.__version__}. "
             f"Greedy decoding, prompt {prompt_len} tokens, {new_tokens} new tokens timed, one CUDA graph per token"
             f"{' of a torch.compile-d forward (both variants)' if compile else ''}, static KV cache, random weights, "
             f"E = {experts}.",
             "",
             "| model shape | batch | fp16 tok/s | BinaryMoS tok/s | speed-up | fp16 weights / peak GB "
             "| BinaryMoS weights / peak GB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] != "fp16":
            continue
        b = next(o for o in rows if o["model"] == r["model"] and o["batch"] == r["batch"] and o["variant"] != "fp16")
        lines.append(f"| {r['model']} | {r['batch']} | {r['tok_s']:.1f} | {b['tok_s']:.1f} | "
                     f"{b['tok_s'] / r['tok_s']:.2f}x | {r['weights_gb']:.2f} / {r['peak_gb']:.2f} | "
                     f"{b['weights_gb']:.2f} / {b['peak_gb']:.2f} |")
    return "\n".join(lines + profile_table(rows)) + "\n"


def profile_table(rows) -> list[str]:
    """Markdown lines splitting each profiled row's ms a token: kernels by kind (KERNEL_KINDS), and the rest of the
    timed replays' wall time, in which the GPU ran no kernel."""
    profiled_rows = [r for r in rows if r.get("kernel_ms")]
    if not profiled_rows:
        return []
    kinds = [kind for kind, _ in KERNEL_KINDS] + ["other"]
    lines = ["", "ms a token by kernel kind (torch.profiler over replays of the same graph; idle: the timed wall "
             "time less every kernel's):", "",
             f"| model shape | batch | variant | wall | {' | '.join(kinds)} | idle | kernels a token |",
             "|---|---|---|" + "---:|" * (len(kinds) + 3)]
    for r in profiled_rows:
        ms = r["kernel_ms"]
        idle = r["ms_per_step"] - sum(ms[kind] for kind in kinds)
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms_per_step']:.3f} | "
                     + " | ".join(f"{ms[kind]:.3f}" for kind in kinds) + f" | {idle:.3f} | {ms['kernels']:.0f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="markdown file (default: $OUT/decode.md, else stdout only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward of both variants")
    p.add_argument("--experts", "-E", type=int, default=4, help="scaling experts of the packed layers (default 4)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N more replays of each graph: ms a token by kernel kind (default 0: off)")
    args = p.parse_args(argv)
    if args.experts < 1:
        p.error("--experts must be >= 1")
    if args.profile < 0:
        p.error("--profile must be >= 0")
    if not torch.cuda.is_available():
        print("decode: needs a CUDA GPU", file=sys.stderr)
        return 1
    rows = run(args.models.split(","), [int(b) for b in args.batch.split(",")], args.prompt_len, args.new_tokens,
               args.compile, args.experts, args.profile)
    text = markdown(rows, args.prompt_len, args.new_tokens, args.compile, args.experts)
    out = args.out or (os.path.join(os.environ["OUT"], "decode.md") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
