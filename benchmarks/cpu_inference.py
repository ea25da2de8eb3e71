"""The packed model on the CPU: one layer's product by each plain-PyTorch path, and greedy decoding end to end.

Per layer (float32, E=4, medians of repeated calls, microseconds): a dense float32 ``F.linear`` of the same
shape; the unpacking written as before (shift and mask the bits, then +-1: ``unpack_by_shifts`` below); the
reference path now (signs looked up per byte, then matmul); the byte-table product ``binary_mos_linear_lut``
(what the layer runs for up to LUT_MAX_TOKENS tokens). End to end: tokens/s of greedy decoding of SmolLM2-135M
in float32 and of the same model binarized (E=4, untrained: speed needs no trained weights), packed and loaded
with ``binarymos.load``, each through transformers' ``generate``; the packed model also with the byte tables off and
with the old unpacking, in interleaved rounds.

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

from binarymos.kernels import binary_mos_linear_lut, binary_mos_linear_reference
from binarymos.nn import pack_signs

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008)]  # SmolLM2's, LLaMA-7B's


def unpack_by_shifts(packed: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """unpack_signs as it was before the byte table: shift, mask, convert, scale and shift."""
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.view(packed.shape[0], -1)[:, :in_features].to(dtype) * 2 - 1


def median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def layer_rows(tokens: list[int], repeats: int) -> list[str]:
    rows = ["| in -> out | tokens | dense fp32 | unpack by shifts + matmul | unpack by table + matmul | byte tables |",
            "|---|---:|---:|---:|---:|---:|"]
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

            times = [median_us(f, repeats) for f in (lambda: F.linear(x, dense), by_shifts,
                                                      lambda: binary_mos_linear_reference(x, *args),
                                                      lambda: binary_mos_linear_lut(x, *args))]
            rows.append(f"| {in_f} -> {out_f} | {m} | " + " | ".join(f"{t:,.0f}" for t in times) + " |")
            print(rows[-1], flush=True)
    return rows


def decode_rows(new_tokens: int, repeats: int) -> list[str]:
    """Median tokens/s over ``repeats`` interleaved rounds (the machine's noise is large) of each variant."""
    import binarymos
    from binarymos import BinaryMoSConfig, binarize, kernels, nn
    from binarymos.models import load_model
    from binarymos.pack import pack_model, save

    teacher, tokenizer = load_model("smollm2-135m")
    prompt = tokenizer("The history of the city", return_tensors="pt").input_ids
    with tempfile.TemporaryDirectory() as tmp:
        save(pack_model(binarize(load_model("smollm2-135m")[0], BinaryMoSConfig(num_experts=4))), tmp, tokenizer)
        packed = binarymos.load(tmp)
    shipped = (kernels.LUT_MAX_TOKENS, nn.unpack_signs)
    variants = {"SmolLM2-135M, float32": (teacher, shipped),
                f"packed E=4, as shipped (byte tables for <= {kernels.LUT_MAX_TOKENS} tokens)": (packed, shipped),
                "packed E=4, unpack by table + matmul only": (packed, (0, nn.unpack_signs)),
                "packed E=4, as before (unpack by shifts + matmul)": (packed, (0, unpack_by_shifts))}
    rates = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (model, (lut_tokens, unpack)) in variants.items():
            kernels.LUT_MAX_TOKENS, nn.unpack_signs = lut_tokens, unpack
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=2, do_sample=False)
                start = time.perf_counter()
                model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            rates[name].append(new_tokens / (time.perf_counter() - start))
    kernels.LUT_MAX_TOKENS, nn.unpack_signs = shipped
    rows = [f"| model (batch 1, greedy, {new_tokens} tokens) | tokens/s, median of {repeats} | all rounds |",
            "|---|---:|---|"]
    for name, values in rates.items():
        rows.append(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,4,8", help="tokens per layer call, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens generated end to end (0: skip)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the end-to-end variants")
    parser.add_argument("--out", default=None, help="markdown file for the tables")
    args = parser.parse_args()
    head = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {datetime.date.today()}")
    print(head)
    rows = [head, "", *layer_rows([int(t) for t in args.tokens.split(",")], args.repeats)]
    if args.new_tokens:
        rows += ["", *decode_rows(args.new_tokens, args.rounds)]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
