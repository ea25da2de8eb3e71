"""Latency of one BinaryMoS linear layer on the GPU: fp16 cuBLAS, the reference PyTorch layer, ours.

For the paper's six LLaMA shapes and M tokens it reports eager and CUDA-graph medians in
microseconds and ours as % of the HBM roofline (the fewest bytes the layer must move over the
copy bandwidth measured in the same run), after checking ours against a float64 reference with
the output poisoned (NaN) before every run, at every shape and M in {1, 4, 16, 256, 2048} in fp16
(in bf16 at M in {1, 16, 2048}). Weights rotate among copies that together exceed the L2 cache, so the timings
read HBM as decoding a whole model does.

    PYTHONPATH=src python benchmarks/linear_latency.py --out docs/linear_latency.md
    PYTHONPATH=src python benchmarks/linear_latency.py --sweep   # time tile configs, print the best

--sweep times, per shape and M, the one-token GEMV's tiles (M = 1), the decode tiles (M <= 16; first the
default tile with PDL off and on, --decode-configs 2 for those alone) and the prefill's PREP_BLOCK_M (M > 16). At M = 1 each GEMV tile runs with the router inline (ROUTER_INLINE=1:
one launch) and as a launch of its own (ROUTER_INLINE=0, with and without PDL), the default tile also
with other inline router steps (ROUTER_BLOCK_K); the summary gives the best of each way.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from binarymos.kernels import binary_mos_linear_reference
from binarymos.kernels.triton_kernels import GEMV_SWEEP, binary_mos_linear_triton, decode_config, gemv_config
from binarymos.nn import BinaryMoSLinear

PAPER_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 5120), (5120, 13824), (13824, 5120)]  # (in, out)
TIMED_M = [1, 16, 256, 2048]
CHECKED_M = [1, 4, 16, 256, 2048]
ROTATE_BYTES = 200e6  # weight copies per timing: together four times the H100's 50 MB L2


def random_layer(in_f: int, out_f: int, experts: int, dtype, device, seed: int = 0) -> dict:
    """Packed layer tensors with random signs, router and positive scales of realistic size."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = {"generator": g, "device": device}
    return {
        "packed_weight": torch.randint(0, 256, (out_f, (in_f + 7) // 8), dtype=torch.uint8, **kw),
        "router": (torch.randn(experts, in_f, **kw) * 0.05).to(dtype),
        "scale_in": (torch.rand(experts, in_f, **kw) + 0.5).to(dtype),
        "scale_out": ((torch.rand(experts, out_f, **kw) + 0.5) / math.sqrt(in_f)).to(dtype),
        "bias": None,
    }


def reference64(x: torch.Tensor, layer: dict) -> torch.Tensor:
    return binary_mos_linear_reference(x.double(), layer["packed_weight"], layer["router"].double(),
                                       layer["scale_in"].double(), layer["scale_out"].double(), None)


def check(shapes, ms, dtypes, device, experts: int = 4) -> list[tuple]:
    """Relative error of ours against float64, output poisoned before the run; NaN if a value was left unwritten."""
    rows = []
    for dtype in dtypes:
        for in_f, out_f in shapes:
            layer = random_layer(in_f, out_f, experts, dtype, device, seed=in_f + out_f)
            for m in ms:
                x = torch.randn(m, in_f, device=device).to(dtype)
                ref = reference64(x, layer)
                out = torch.full((m, out_f), float("nan"), device=device, dtype=dtype)
                binary_mos_linear_triton(x, **layer, out=out)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                rows.append((str(dtype).removeprefix("torch."), in_f, out_f, m, err))
    return rows


def copy_bandwidth(device) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    src = torch.empty(2**28, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times[5:])


def time_calls(calls, graph: bool, reps: int = 15) -> float:
    """Median microseconds per call over ``reps`` runs of all calls (each call on its own copy of the weights)."""
    for c in calls:  # warm-up: compilation, autotuning, handles
        c()
    torch.cuda.synchronize()
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        run = g.replay
    else:
        def run():
            for c in calls:
                c()
    run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def time_eager_and_graph(name: str, calls) -> dict:
    """{name_eager, name_graph}: microseconds per call; the calls' tensors are freed afterwards."""
    times = {f"{name}_eager": time_calls(calls, graph=False), f"{name}_graph": time_calls(calls, graph=True)}
    del calls
    torch.cuda.empty_cache()
    return times


def copies(nbytes: int) -> int:
    return max(2, min(64, math.ceil(ROTATE_BYTES / nbytes)))


def ours_calls(in_f, out_f, m, dtype, device, config=None, experts: int = 4):
    layer_bytes = out_f * ((in_f + 7) // 8) + 2 * experts * (2 * in_f + out_f)
    layers = [random_layer(in_f, out_f, experts, dtype, device, seed=i) for i in range(copies(layer_bytes))]
    x = torch.randn(m, in_f, device=device).to(dtype)
    outs = [torch.empty(m, out_f, device=device, dtype=dtype) for _ in layers]
    return [lambda l=l, o=o: binary_mos_linear_triton(x, **l, config=config, out=o) for l, o in zip(layers, outs)]


def cublas_calls(in_f, out_f, m, dtype, device):
    weights = [torch.randn(out_f, in_f, device=device, dtype=dtype) for _ in range(copies(2 * in_f * out_f))]
    x = torch.randn(m, in_f, device=device, dtype=dtype)
    return [lambda w=w: F.linear(x, w) for w in weights]


def reference_calls(in_f, out_f, m, dtype, device, experts: int = 4):
    """The authors' way: the fp16 latent weight binarized on every call, scales mixed in PyTorch."""
    layers = []
    for _ in range(copies(2 * in_f * out_f)):
        layer = BinaryMoSLinear(in_f, out_f, num_experts=experts, device=device, dtype=dtype).eval()
        layer.requires_grad_(False)
        layers.append(layer)
    x = torch.randn(m, in_f, device=device, dtype=dtype)
    return [lambda l=l: l(x) for l in layers]


def ideal_bytes(in_f, out_f, m, experts=4) -> tuple[int, int]:
    """Fewest bytes moved by one call: (ours, fp16 dense). Inputs read once, output written once."""
    acts = 2 * m * (in_f + out_f)
    ours = out_f * ((in_f + 7) // 8) + 2 * experts * (2 * in_f + out_f) + acts
    return ours, 2 * in_f * out_f + acts


def benchmark(shapes, ms, device, on_row=lambda rows, bw: None, experts: int = 4) -> tuple[list[dict], float]:
    """One row per shape and M, ours and the reference with ``experts`` experts."""
    bw = copy_bandwidth(device)
    rows = []
    for in_f, out_f in shapes:
        for m in ms:
            ours_b, dense_b = ideal_bytes(in_f, out_f, m, experts)
            row = {"shape": f"{in_f}->{out_f}", "M": m, "roofline_us": ours_b / bw * 1e6,
                   "cublas_roofline_us": dense_b / bw * 1e6}
            row |= time_eager_and_graph("cublas", cublas_calls(in_f, out_f, m, torch.float16, device))
            row |= time_eager_and_graph("reference", reference_calls(in_f, out_f, m, torch.float16, device, experts))
            row |= time_eager_and_graph("ours", ours_calls(in_f, out_f, m, torch.float16, device, experts=experts))
            rows.append(row)
            print(f"{row['shape']:>12} M={m:<5} cuBLAS {row['cublas_graph']:8.1f} us  ours {row['ours_graph']:8.1f} us  "
                  f"({row['cublas_graph'] / row['ours_graph']:.2f}x, "
                  f"{100 * row['roofline_us'] / row['ours_graph']:.0f}% of roofline)", flush=True)
            on_row(rows, bw)
    return rows, bw


DECODE_SWEEP = [dict(BLOCK_N=n, BLOCK_G=g, num_warps=w, num_stages=s) for n, g, w, s in
                [(32, 64, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4),
                 (256, 32, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3)]]
PREP_BLOCK_M_SWEEP = [1, 4, 8, 16]  # rows per program of the prefill's prep kernel
ROUTER_BLOCK_K_SWEEP = [1024, 4096]  # inline router steps tried on the default GEMV tile besides its own


def gemv_sweep(in_f: int, out_f: int) -> list[dict]:
    """The M = 1 configs: every GEMV tile with the router inline and as its own launch (PDL off, on), the
    default tile with other inline router steps, and the mma decode kernel's default."""
    default = gemv_config(out_f, in_f, torch.float16)
    return ([dict(c, ROUTER_INLINE=1) for c in GEMV_SWEEP]
            + [dict(c, ROUTER_INLINE=0, PDL=pdl) for c in GEMV_SWEEP for pdl in (0, 1)]
            + [dict(default, ROUTER_INLINE=1, ROUTER_BLOCK_K=b) for b in ROUTER_BLOCK_K_SWEEP]
            + [decode_config(1, out_f, in_f)])


def variant(cfg: dict) -> str:
    """How an M = 1 config gets its gates: the summary's best per variant compares them."""
    if "BLOCK_G" in cfg:
        return "mma decode kernel"
    if cfg.get("ROUTER_INLINE"):
        return "router inline (1 launch)"
    return "router launch + PDL" if cfg.get("PDL") else "router launch, no PDL"


def sweep(shapes, ms, device, decode_configs: int | None = None, experts: int = 4) -> list[tuple]:
    """CUDA-graph time and error of every tile config, per shape and M; returns (shape, M, config, us) rows.
    For 2 <= M <= 16: the default tile with PDL off and on, then DECODE_SWEEP's tiles (PDL off), the first
    ``decode_configs`` of these (None: all)."""
    rows = []
    for in_f, out_f in shapes:
        for m in ms:
            print(f"{in_f}->{out_f} M={m} cuBLAS fp16 {time_calls(cublas_calls(in_f, out_f, m, torch.float16, device), True):.1f} us")
            layer = random_layer(in_f, out_f, experts, torch.float16, device)
            x = torch.randn(m, in_f, device=device).half()
            ref = reference64(x, layer)
            prefill = [{"PREP_BLOCK_M": b} for b in PREP_BLOCK_M_SWEEP]
            decode = [dict(decode_config(m, out_f, in_f), PDL=pdl) for pdl in (0, 1)] + DECODE_SWEEP
            for cfg in gemv_sweep(in_f, out_f) if m == 1 else decode[:decode_configs] if m <= 16 else prefill:
                try:
                    us = time_calls(ours_calls(in_f, out_f, m, torch.float16, device, cfg, experts), graph=True)
                    err = ((binary_mos_linear_triton(x, **layer, config=cfg).double() - ref).norm() / ref.norm()).item()
                except Exception as e:  # a tile too large for the shared memory, say
                    print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                rows.append((f"{in_f}->{out_f}", m, cfg, us))
                print(f"{in_f}->{out_f} M={m} {cfg} {us:.1f} us err {err:.1e}", flush=True)
    return rows


def markdown(rows, bw, check_rows, device_name, experts: int = 4) -> str:
    lines = [f"Device: {device_name}; {datetime.date.today().isoformat()}; torch {torch.__version__}; "
             f"measured copy bandwidth {bw / 1e12:.2f} TB/s (read + write); E = {experts}.", "",
             "Microseconds per call, median; CUDA graph = replay of a captured graph of calls. Ours at % of the "
             "HBM roofline = (fewest bytes moved / copy bandwidth) / time.", "",
             "| shape (in->out) | M | cuBLAS fp16 eager | cuBLAS fp16 graph | reference eager | reference graph "
             "| ours eager | ours graph | speed-up vs cuBLAS (graph) | ours % of roofline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['M']} | {r['cublas_eager']:.1f} | "
                     f"{r['cublas_graph']:.1f} | {r['reference_eager']:.1f} | {r['reference_graph']:.1f} | "
                     f"{r['ours_eager']:.1f} | {r['ours_graph']:.1f} | {r['cublas_graph'] / r['ours_graph']:.2f}x | "
                     f"{100 * r['roofline_us'] / r['ours_graph']:.0f}% |")
    for m in sorted({r["M"] for r in rows}):
        sel = [r for r in rows if r["M"] == m]
        geo = math.exp(statistics.mean(math.log(r["cublas_graph"] / r["ours_graph"]) for r in sel))
        lines.append(f"\nM = {m}: geometric-mean speed-up over fp16 cuBLAS (CUDA graph) {geo:.2f}x.")
    if check_rows:
        worst = max(check_rows, key=lambda r: r[-1] if not math.isnan(r[-1]) else math.inf)
        lines += ["", "Correctness against float64 (output poisoned with NaN before each run), relative error "
                  "||y - y64|| / ||y64||:", "", "| dtype | shape | M | rel. error |", "|---|---|---|---|"]
        lines += [f"| {d} | {i}->{o} | {m} | {e:.2e} |" for d, i, o, m, e in check_rows]
        lines.append(f"\nWorst: {worst[-1]:.2e} ({worst[0]}, {worst[1]}->{worst[2]}, M={worst[3]}).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="markdown file (default: $OUT/linear_latency.md, else stdout only)")
    p.add_argument("--shapes", default=None, help="in:out,... (default: the paper's six)")
    p.add_argument("--m", default=None, help="token counts to time, comma-separated (default 1,16,256,2048)")
    p.add_argument("--sweep", action="store_true", help="time the tile configs instead, print the best per shape")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--experts", "-E", type=int, default=4, help="scaling experts of the timed layers (default 4)")
    p.add_argument("--decode-configs", type=int, default=None,
                   help="--sweep at 2 <= M <= 16: time only the first N configs (2: the default tile, PDL off and on)")
    args = p.parse_args(argv)
    if args.experts < 1:
        p.error("--experts must be >= 1")
    if not torch.cuda.is_available():
        print("linear_latency: needs a CUDA GPU", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes else PAPER_SHAPES
    ms = [int(v) for v in args.m.split(",")] if args.m else TIMED_M
    if args.sweep:
        rows = sweep(shapes, ms, device, args.decode_configs, args.experts)
        for key in sorted({(s, m) for s, m, _, _ in rows}):
            sel = [r for r in rows if (r[0], r[1]) == key]
            best = min(sel, key=lambda r: r[-1])
            print(f"best {key[0]} M={key[1]}: {best[3]:.1f} us {best[2]}")
            if key[1] == 1:  # the router inline against its own launch, each at its best tile
                for name in sorted({variant(r[2]) for r in sel}):
                    b = min((r for r in sel if variant(r[2]) == name), key=lambda r: r[-1])
                    print(f"    {name:<26} {b[3]:.1f} us {b[2]}")
        return 0
    check_rows = [] if args.no_check else (check(shapes, CHECKED_M, [torch.float16], device, args.experts)
                                           + check(shapes, [1, 16, 2048], [torch.bfloat16], device, args.experts))
    bad = [r for r in check_rows if not r[-1] < 1e-2]
    out = args.out or (os.path.join(os.environ["OUT"], "linear_latency.md") if os.environ.get("OUT") else None)

    def write(rows, bw):  # after every row, so that a run cut short keeps what it measured
        if out:
            Path(out).write_text(markdown(rows, bw, check_rows, torch.cuda.get_device_name(), args.experts))

    rows, bw = benchmark(shapes, ms, device, write, args.experts)
    print(markdown(rows, bw, check_rows, torch.cuda.get_device_name(), args.experts))
    if bad:
        print(f"linear_latency: {len(bad)} checks over 1e-2: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
