"""The training layer on a GPU: the fused BinaryMoSLinear (hand-written backward, Triton row kernels)
against the same layer as plain autograd ops, for accuracy and time (issue 5).

    python benchmarks/training_layer.py --out $OUT/training_layer.md

For SmolLM2-135M's four layer shapes at batch 8 x 2048 tokens, E in {4, 2} (E = 1 always runs the
formula), bf16 activations (as under --bf16-compute): the relative error of the output and of every
gradient against a float64 computation of the formula (the sign's gradient passed straight through
where |w| <= 1), for both spellings, and the median time of one forward + backward (CUDA events, 20 repeats after 5 warm-ups).

    python benchmarks/training_layer.py --sweep-backward 64x0,16x0,64x64,32x64,128x64,64x128 --out $OUT/backward_sweep.md

times the row-scaling backward kernel alone (binarymos.kernels.training's _scale_rows_backward_kernel) at each
ROWSxCOLUMNS per program (COLUMNS 0: the whole row, session 14's kernel), for every width the layer shapes scale
(E=4), with its largest relative difference from the plain-PyTorch formulas: session 14's profile found that
kernel at 56 us a call against 18 us for the forward, with 256 programs for 16,384 rows. Each call is timed as a
CUDA graph's replay: timed eagerly (session 15), the host's launches and allocations took most of the time.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from binarymos.nn import BinaryMoSLinear

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  # q/o, k/v, gate/up, down


def make_layer(in_f: int, out_f: int, experts: int) -> BinaryMoSLinear:
    torch.manual_seed(0)
    layer = BinaryMoSLinear.from_linear(torch.nn.Linear(in_f, out_f, bias=False), experts).cuda()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.05)
        layer.scale_in.mul_(torch.rand_like(layer.scale_in) + 0.5)
        layer.scale_out.mul_(torch.rand_like(layer.scale_out) + 0.5)
    return layer


def autocast(forward):
    """The forward under bf16 autocast, as the training loop runs it on a GPU."""
    def run(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return forward(x)
    return run


def float64_grads(layer: BinaryMoSLinear, x: torch.Tensor, upstream: torch.Tensor) -> dict:
    p = {n: t.detach().double().requires_grad_(True) for n, t in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    w = p["weight"]
    signs = torch.where(w.detach() >= 0, 1.0, -1.0).double() + (w - w.detach()) * (w.detach().abs() <= 1)
    if layer.num_experts > 1:
        gates = torch.softmax(x64 @ p["router.weight"].T, -1)
        s_in, s_out = gates @ p["scale_in"], gates @ p["scale_out"]
    else:
        s_in, s_out = p["scale_in"][0], p["scale_out"][0]
    y = ((x64 * s_in) @ signs.T) * s_out
    (y * upstream.double()).sum().backward()
    return {"y": y.detach(), "x": x64.grad, **{n: t.grad for n, t in p.items() if t.grad is not None}}


def measured(layer: BinaryMoSLinear, forward, x: torch.Tensor, upstream: torch.Tensor) -> dict:
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = forward(x)
    (y * upstream).sum().backward()
    return {"y": y.detach(), "x": x.grad, **{n: t.grad for n, t in layer.named_parameters() if t.grad is not None}}


def median_ms(run, warmup: int = 5, repeats: int = 20) -> float:
    """The median of ``run()``'s GPU time in ms (CUDA events), after ``warmup`` calls."""
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def profile(layer, forward, x, upstream, name: str) -> str:
    """torch.profiler's kernel table of 5 forward + backward passes (after 3 warm-ups)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = x.detach().requires_grad_(True)
    for _ in range(3):
        (forward(x) * upstream).sum().backward()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            (forward(x) * upstream).sum().backward()
        torch.cuda.synchronize()
    return f"### {name}\n\n```\n{prof.key_averages().table(sort_by='cuda_time_total', row_limit=25)}\n```\n"


def sweep_backward(tokens: int, tiles: list[tuple[int, int]], experts: int = 4) -> list[str]:
    from binarymos.kernels import scale_rows_backward_reference
    from binarymos.kernels import training

    lines = [f"{torch.cuda.get_device_name()}, {tokens} rows, E={experts}, bf16; median us of one backward kernel "
             "call and its two partial sums, replayed as a CUDA graph (CUDA events, 50 repeats after 10 warm-ups)", "",
             "| width | rows x columns per program | programs | us | largest relative difference |",
             "|---:|---:|---:|---:|---:|"]
    default = training.BACKWARD_BLOCK_M, training.BACKWARD_COLUMNS
    for width in sorted({d for shape in SHAPES for d in shape}):
        torch.manual_seed(0)
        grad, saved = (torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        gates = torch.softmax(torch.randn(tokens, experts, device="cuda"), -1)
        scales = torch.rand(experts, width, device="cuda") + 0.5
        reference = scale_rows_backward_reference(grad, saved, gates, scales)
        for rows, columns in tiles:
            training.BACKWARD_BLOCK_M, training.BACKWARD_COLUMNS = rows, columns
            try:
                got = training.scale_rows_backward_triton(grad, saved, gates, scales)
                worst = max(((g.double() - r.double()).norm() / r.double().norm()).item()
                            for g, r in zip(got, reference))
                graph = torch.cuda.CUDAGraph()  # its kernels alone: a replay launches no Python, no allocation
                with torch.cuda.graph(graph):
                    training.scale_rows_backward_triton(grad, saved, gates, scales)
                us = 1e3 * median_ms(graph.replay, warmup=10, repeats=50)
            finally:
                training.BACKWARD_BLOCK_M, training.BACKWARD_COLUMNS = default
            programs = -(-tokens // rows) * (-(-width // columns) if columns else 1)
            lines.append(f"| {width} | {rows}x{columns or 'all'} | {programs} | {us:.1f} | {worst:.1e} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--experts", default="4,2")
    p.add_argument("--profile", default=None, help="IN:OUT: print torch.profiler's tables for this shape and exit")
    p.add_argument("--sweep-backward", default=None, help="comma-separated ROWSxCOLUMNS per program: time the "
                                                               "backward row kernel alone at each (see above) and exit")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.sweep_backward:
        tiles = [tuple(int(n) for n in v.split("x")) for v in args.sweep_backward.split(",")]
        lines = sweep_backward(args.tokens, tiles)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        return
    if args.profile:
        in_f, out_f = (int(v) for v in args.profile.split(":"))
        for experts in (int(e) for e in args.experts.split(",")):
            layer = make_layer(in_f, out_f, experts)
            x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.bfloat16)
            upstream = torch.randn(args.tokens, out_f, device="cuda", dtype=torch.bfloat16)
            for name, forward in {"fused": layer.forward, "formula": layer.formula_forward}.items():
                print(profile(layer, autocast(forward), x, upstream, f"{in_f} -> {out_f}, E={experts}, {name}"))
        return
    lines = [f"{torch.cuda.get_device_name()}, {args.tokens} tokens, bf16 activations; relative error against "
             "float64 (worst of y and every gradient); forward + backward median ms", "",
             "| in -> out | E | fused worst error | formula worst error | fused ms | formula ms | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for experts in (int(e) for e in args.experts.split(",")):
        for in_f, out_f in SHAPES:
            layer = make_layer(in_f, out_f, experts)
            x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.bfloat16)
            upstream = torch.randn(args.tokens, out_f, device="cuda", dtype=torch.bfloat16)
            ref = float64_grads(layer, x, upstream)
            spellings = {"fused": autocast(layer.forward), "formula": autocast(layer.formula_forward)}
            worst, ms = {}, {}
            for name, forward in spellings.items():
                got = measured(layer, forward, x, upstream)
                worst[name] = max(((got[k].double() - r).norm() / r.norm()).item() for k, r in ref.items())
                x_grad = x.detach().requires_grad_(True)
                ms[name] = median_ms(lambda: (forward(x_grad) * upstream).sum().backward())
            lines.append(f"| {in_f} -> {out_f} | {experts} | {worst['fused']:.2e} | {worst['formula']:.2e} | "
                         f"{ms['fused']:.3f} | {ms['formula']:.3f} | {ms['formula'] / ms['fused']:.2f}x |")
            print(lines[-1], flush=True)
            if args.out:
                Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
