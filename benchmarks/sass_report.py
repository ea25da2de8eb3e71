"""Offline SASS report of the one-token (M == 1) sign-flip kernel: no GPU needed.

Compiles ``_gemv_kernel`` (and the router launch before it, if the config has one: ROUTER_INLINE=0)
for sm_90 exactly as the JIT would for the given shape and tile (the same launch arguments, through
``gemv_launches``, and the same specialisation: pointers and sizes divisible by 16 marked so, ints
equal to 1 made constants),
disassembles the cubin with Triton's bundled ``cuobjdump`` and prints per kernel:

* registers, spill traffic (local-memory bytes and LDL/STL count), shared memory;
* the main loop (the longest backward branch) of a compile with STEPS > 1: its instruction
  count divided by the signs one thread handles per iteration (BLOCK_N * BLOCK_W * 32 /
  threads), i.e. lane-instructions per sign, and its instruction mix;
* the whole program of the real launch: static instructions (when STEPS == 1 the loop is gone
  and every instruction runs about once) and an estimate of the instructions a thread executes,
  static + (STEPS - 1) * loop, per sign of the program.

    python benchmarks/sass_report.py                         # default config, the paper's six shapes
    python benchmarks/sass_report.py --sweep                 # every config of GEMV_SWEEP
    python benchmarks/sass_report.py --configs "BLOCK_N=64,BLOCK_W=32,num_warps=4,num_stages=2" \
        --shapes 4096:4096 --dtype bf16 --dump /tmp/sass    # also writes .sass/.ptx/.ttgir files
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton >= 3.9 warns when unset; 1 is the old default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from binarymos.kernels import triton_kernels as tk  # noqa: E402

PAPER_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 5120), (5120, 13824), (13824, 5120)]  # (in, out)
TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
CLASSES = [  # (name, opcode prefixes); first match wins
    ("SHF", ("SHF",)), ("IMAD.SHL", ("IMAD.SHL",)), ("LOP3", ("LOP3",)), ("HADD2.F32", ("HADD2.F32",)),
    ("HADD2/HFMA2", ("HADD2", "HFMA2", "HMUL2")), ("FADD", ("FADD",)), ("FFMA/FMUL", ("FFMA", "FMUL")),
    ("F2F/F2FP", ("F2F", "F2FP")), ("PRMT", ("PRMT",)), ("LDG", ("LDG",)), ("LDGSTS", ("LDGSTS",)),
    ("LDS", ("LDS",)), ("STS", ("STS",)), ("LDL/STL", ("LDL", "STL")), ("BAR", ("BAR",)), ("SHFL", ("SHFL",)),
    ("MOV", ("MOV",)), ("IMAD/IADD/LEA", ("IMAD", "IADD", "LEA", "VIADD")), ("ISETP/SEL", ("ISETP", "SEL", "FSEL")),
]
INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


def compile_launch(kernel, args, kwargs):
    """triton.compile of one launch for TARGET, specialised as the JIT specialises it."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def sass_of(cubin: bytes) -> tuple[list[tuple[int, str, str]], str]:
    """[(address, opcode, operands)] and the -res-usage text of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    instrs = []
    for line in sass.splitlines():
        m = INSTR.match(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return instrs, res


def resources(res: str) -> dict:
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups()))) if m else {}


def main_loop(instrs) -> list[tuple[int, str, str]]:
    """Instructions of the longest backward branch's span (the main loop), [] if none."""
    best = []
    for i, (addr, op, rest) in enumerate(instrs):
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", rest)
            if m and int(m.group(1), 16) <= addr:
                body = [ins for ins in instrs[:i + 1] if int(m.group(1), 16) <= ins[0] <= addr]
                if len(body) > len(best):
                    best = body
    return best


def mix(instrs) -> collections.Counter:
    out = collections.Counter()
    for _, op, _ in instrs:
        if op == "NOP":
            continue
        name = next((n for n, prefixes in CLASSES if op.startswith(prefixes)), "other")
        out[name] += 1
    return out


def count(instrs) -> int:
    return sum(op != "NOP" for _, op, _ in instrs)


def layer_tensors(in_f, out_f, experts, dtype):
    """CPU tensors of the launch's shapes and dtypes: only dtype, alignment and sizes reach the compiler."""
    return dict(
        x2=torch.zeros(1, in_f, dtype=dtype), packed_weight=torch.zeros(out_f, (in_f + 7) // 8, dtype=torch.uint8),
        router=torch.zeros(experts, in_f, dtype=dtype) if experts > 1 else None,
        scale_in=torch.zeros(experts, in_f, dtype=dtype), scale_out=torch.zeros(experts, out_f, dtype=dtype),
        bias=None, y=torch.zeros(1, out_f, dtype=dtype))


def report(in_f, out_f, cfg, dtype=torch.float16, experts=4, dump=None) -> dict:
    t = layer_tensors(in_f, out_f, experts, dtype)
    if not tk.gemv_applies(t["packed_weight"]):
        return {"shape": f"{in_f}->{out_f}", "error": "ceil(in/8) % 4 != 0: the M == 1 call takes _decode_kernel"}
    launches = tk.gemv_launches(t["x2"], t["packed_weight"], t["router"], t["scale_in"], t["scale_out"], t["bias"],
                                t["y"], cfg, False)
    kernel, grid, args, kwargs = launches[-1]
    i_steps = kernel.arg_names.index("STEPS")
    steps, threads = args[i_steps], 32 * kwargs.get("num_warps", 4)
    signs_iter = kwargs["BLOCK_N"] * kwargs["BLOCK_W"] * 32 / threads
    real = compile_launch(kernel, args, kwargs)
    instrs, res = sass_of(real.asm["cubin"])
    looped = compile_launch(kernel, args[:i_steps] + (max(2, steps),) + args[i_steps + 1:], kwargs)
    linstrs, _ = sass_of(looped.asm["cubin"])
    loop = main_loop(linstrs)
    row = dict(shape=f"{in_f}->{out_f}", dtype=str(dtype).removeprefix("torch."), experts=experts,
               cfg={k: v for k, v in cfg.items()}, grid=grid, programs=grid[0] * grid[1], split=kwargs["SPLIT"],
               steps=steps, **resources(res), spill_instrs=sum(op.startswith(("LDL", "STL")) for _, op, _ in instrs),
               kernel_instrs=count(instrs), loop_instrs=count(loop), signs_per_thread_iter=signs_iter,
               loop_per_sign=count(loop) / signs_iter if loop else float("nan"), loop_mix=mix(loop))
    # executed per thread: the real kernel's static count, plus the loop body again for each step
    # after the first (with STEPS == 1 the compiler drops the loop: every instruction runs once)
    rloop = count(main_loop(instrs)) if steps > 1 else 0
    row["program_per_sign"] = (count(instrs) + (steps - 1) * rloop) / (steps * signs_iter)
    if len(launches) > 1:
        rk, _, rargs, rkw = launches[0]
        router = compile_launch(rk, rargs, rkw)
        rinstrs, rres = sass_of(router.asm["cubin"])
        row["router"] = dict(programs=launches[0][1][0], instrs=count(rinstrs), **resources(rres))
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        stem = Path(dump) / f"gemv_{in_f}x{out_f}_{'_'.join(f'{k}{v}' for k, v in cfg.items())}"
        for ext in ("ptx", "ttgir"):
            Path(f"{stem}.{ext}").write_text(real.asm[ext])
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(real.asm["cubin"])
            f.flush()
            Path(f"{stem}.sass").write_text(subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name],
                                                           capture_output=True, text=True).stdout)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as g:
                g.write(looped.asm["cubin"])
                g.flush()
                Path(f"{stem}.loop.sass").write_text(subprocess.run([str(BIN / "cuobjdump"), "-sass", g.name],
                                                                    capture_output=True, text=True).stdout)
    return row


def fmt(row: dict) -> str:
    if "error" in row:
        return f"{row['shape']}: {row['error']}"
    cfg = ",".join(f"{k}={v}" for k, v in row["cfg"].items())
    top = ", ".join(f"{k} {v}" for k, v in row["loop_mix"].most_common())
    s = (f"{row['shape']:>12} {row['dtype']} E={row['experts']} [{cfg}] grid {row['grid']} ({row['programs']} programs,"
         f" split {row['split']}, steps {row['steps']})\n"
         f"    regs {row['regs']}, spills: local {row['local']} B / stack {row['stack']} B / "
         f"{row['spill_instrs']} LDL+STL,"
         f" shared {row['shared']} B; kernel {row['kernel_instrs']} instrs\n"
         f"    loop {row['loop_instrs']} instrs / {row['signs_per_thread_iter']:.0f} signs per thread = "
         f"{row['loop_per_sign']:.2f} lane-instr/sign; whole program ~{row['program_per_sign']:.2f}/sign\n"
         f"    loop mix: {top}")
    if "router" in row:
        r = row["router"]
        s += f"\n    router: {r['programs']} programs, {r['instrs']} instrs, regs {r['regs']}, local {r['local']} B"
    return s


def brief(row: dict) -> str:
    """One markdown table row (columns of BRIEF_HEADER)."""
    if "error" in row:
        return f"| {row['shape']} | {row['error']} |"
    cfg = row["cfg"]
    tile = f"{cfg['BLOCK_N']}x{cfg['BLOCK_W']}, {cfg.get('num_warps', 4)}w" + "".join(
        f", {k}={v}" for k, v in cfg.items() if k not in ("BLOCK_N", "BLOCK_W", "num_warps", "num_stages"))
    spills = row["local"] + row["stack"]
    return (f"| {row['shape']} | {tile} | {row['programs']} | {row['split']} | {row['steps']} | {row['regs']} | "
            f"{spills} | {row['loop_per_sign']:.2f} | {row['program_per_sign']:.2f} |")


BRIEF_HEADER = ("| shape | tile (rows x words, warps) | programs | split | steps | regs | spill B | loop instr/sign "
                "| program instr/sign |\n|---|---|---|---|---|---|---|---|---|")


def parse_cfg(text: str) -> dict:
    cfg = {}
    for item in text.split(","):
        k, v = item.split("=")
        cfg[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="in:out,... (default: the paper's six)")
    p.add_argument("--configs", default=None, help="configs separated by ';', each k=v,... (default: gemv_config)")
    p.add_argument("--sweep", action="store_true", help="every config of triton_kernels.GEMV_SWEEP")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--dump", default=None, help="folder for .sass/.ptx/.ttgir of each compile")
    p.add_argument("--brief", action="store_true", help="one markdown table row per compile")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")] if args.shapes else PAPER_SHAPES
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    print(f"Triton {triton.__version__}, target sm_{TARGET.arch}, {args.dtype}, E = {args.experts}; lane-instructions "
          "per sign = loop instructions / (BLOCK_N * BLOCK_W * 32 / threads)")
    if args.brief:
        print(BRIEF_HEADER)
    for in_f, out_f in shapes:
        if args.sweep:
            cfgs = [dict(c) for c in tk.GEMV_SWEEP]
        elif args.configs:
            cfgs = [parse_cfg(c) for c in args.configs.split(";") if c.strip()]
        else:
            cfgs = [tk.gemv_config(out_f, in_f, dtype)]
        for cfg in cfgs:
            try:
                row = report(in_f, out_f, cfg, dtype, args.experts, args.dump)
                print(brief(row) if args.brief else fmt(row), flush=True)
            except Exception as e:  # a tile Triton cannot compile, say
                print(f"{in_f}->{out_f} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
