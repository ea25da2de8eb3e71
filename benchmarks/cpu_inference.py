"""The packed model on the CPU: one layer's product by each plain-PyTorch path, and greedy decoding end to end.

Per layer (float32, E=4, medians of repeated calls, microseconds): a dense float32 ``F.linear`` of the same
shape; the unpacking written as before (shift and mask the bits, then +-1: ``unpack_by_shifts`` below); the
reference path now (signs looked up per byte, then matmul); the byte-table product ``binary_mos_linear_lut``
(what the layer runs for up to LUT_MAX_TOKENS tokens); both a chunk of the layer a step (UNPACK_CHUNK signs,
LUT_CHUNK table entries) and, as before, the whole layer in one step.
End to end: tokens/s of greedy decoding of SmolLM2-135M (or,
with ``--decoder llama-1b``, random weights of TinyLlama-1.1B's shape) in float32 and of the same model binarized
(E=4, untrained: speed needs no trained weights), packed and loaded with ``binarymos.load``, each through
transformers' ``generate``; the packed model also with the byte tables compiled (CPU_COMPILE), with them off,
and with the old unpacking, in interleaved rounds.

    PYTHONPATH=src python benchmarks/cpu_inference.py --out cpu_inference.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from binarymos import kernels
from binarymos.kernels import binary_mos_linear_lut, binary_mos_linear_reference
from binarymos.nn import pack_signs

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]  # SmolLM2's,
# LLaMA-7B's


def unpack_by_shifts(packed: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """unpack_signs as it was before the byte table: shift, mask, convert, scale and shift."""
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.view(packed.shape[0], -1)[:, :in_features].to(dtype) * 2 - 1


def medians_us(fns, repeats: int) -> list[float]:
    """Median microseconds of each function, called in interleaved rounds (the machine's noise drifts)."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, kept in zip(fns, times):
            start = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - start)
    return [statistics.median(kept) * 1e6 for kept in times]


def in_one_step(fn):
    """fn with the products taking the whole layer at once (as before LUT_CHUNK and UNPACK_CHUNK)."""
    def call():
        chunks = kernels.LUT_CHUNK, kernels.UNPACK_CHUNK
        kernels.LUT_CHUNK = kernels.UNPACK_CHUNK = 1 << 62
        try:
            return fn()
        finally:
            kernels.LUT_CHUNK, kernels.UNPACK_CHUNK = chunks
    return call


def layer_rows(tokens: list[int], repeats: int) -> list[str]:
    rows = ["| in -> out | tokens | dense fp32 | unpack by shifts + matmul | unpack by table + matmul | the same in one "
            "step | byte tables | byte tables in one step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for in_f, out_f in SHAPES:
        torch.manual_seed(0)
        dense, experts = torch.randn(out_f, in_f), 4
        packed = pack_signs(dense)
        args = (packed, torch.randn(experts, in_f) * 0.02, torch.rand(experts, in_f) + 0.5, torch.rand(experts, out_f))
        for m in tokens:
            x = torch.randn(m, in_f)

            def by_shifts():
                s_in = torch.softmax(x @ args[1].T, -1) @ args[2]
                return F.linear(x * s_in, unpack_by_shifts(packed, in_f, x.dtype))

            unpacked, lut = (lambda: binary_mos_linear_reference(x, *args)), (lambda: binary_mos_linear_lut(x, *args))
            times = medians_us([lambda: F.linear(x, dense), by_shifts, unpacked, in_one_step(unpacked), lut,
                                in_one_step(lut)], repeats)
            rows.append(f"| {in_f} -> {out_f} | {m} | " + " | ".join(f"{t:,.0f}" for t in times) + " |")
            print(rows[-1], flush=True)
    return rows


# decoders to time end to end: SmolLM2-135M as released, or random weights of TinyLlama-1.1B's shape (SmolLM2's
# tokenizer and vocabulary): speed needs no trained weights
DECODERS = {"smollm2-135m": None,
            "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048)}


def decoder(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from binarymos.models import load_model

    if DECODERS[name] is None:
        return load_model(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**DECODERS[name]), dtype=torch.float32).eval()
    return model, load_model("smollm2-135m")[1]


def decode_rows(name: str, new_tokens: int, repeats: int) -> list[str]:
    """Median tokens/s over ``repeats`` interleaved rounds (the machine's noise is large) of each variant."""
    import copy

    import binarymos
    from binarymos import BinaryMoSConfig, binarize, nn
    from binarymos.pack import pack_model, save

    teacher, tokenizer = decoder(name)
    prompt = tokenizer("The history of the city", return_tensors="pt").input_ids
    with tempfile.TemporaryDirectory() as tmp:
        save(pack_model(binarize(copy.deepcopy(teacher), BinaryMoSConfig(num_experts=4))), tmp, tokenizer)
        packed = binarymos.load(tmp)
    shipped = (kernels.LUT_MAX_TOKENS, nn.unpack_signs, kernels.CPU_COMPILE)
    variants = {f"{name}, float32": (teacher, shipped),
                f"packed E=4, as shipped (byte tables for <= {kernels.LUT_MAX_TOKENS} tokens)": (packed, shipped),
                "packed E=4, byte tables compiled (`generate --compile`)": (packed, (*shipped[:2], True)),
                "packed E=4, unpack by table + matmul only": (packed, (0, nn.unpack_signs, False)),
                "packed E=4, unpack by shifts + matmul (before session 10)": (packed, (0, unpack_by_shifts, False))}
    rates = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant, (model, (lut_tokens, unpack, compiled)) in variants.items():
            kernels.LUT_MAX_TOKENS, nn.unpack_signs, kernels.CPU_COMPILE = lut_tokens, unpack, compiled
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=2, do_sample=False)
                start = time.perf_counter()
                model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            rates[variant].append(new_tokens / (time.perf_counter() - start))
    kernels.LUT_MAX_TOKENS, nn.unpack_signs, kernels.CPU_COMPILE = shipped
    rows = [f"| model (batch 1, greedy, {new_tokens} tokens) | tokens/s, median of {repeats} | all rounds |",
            "|---|---:|---|"]
    for variant, values in rates.items():
        rows.append(f"| {variant} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,4,8", help="tokens per layer call, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens generated end to end (0: skip)")
    parser.add_argument("--decoder", default="smollm2-135m", choices=DECODERS, help="the model decoded end to end")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the end-to-end variants")
    parser.add_argument("--out", default=None, help="markdown file for the tables")
    args = parser.parse_args()
    head = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {datetime.date.today()}")
    print(head)
    rows = [head, "", *layer_rows([int(t) for t in args.tokens.split(",")], args.repeats)]
    if args.new_tokens:
        rows += ["", *decode_rows(args.decoder, args.new_tokens, args.rounds)]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
