"""Triton kernels for the packed BinaryMoS layer (design and measurements: docs/KERNELS.md).

Three paths: decode and one token take two launches at most; prefill four, two more per further chunk
of unpacked signs (below):

decode (M <= 16 tokens)
    1. ``_router_kernel``: partial router logits x @ router.T of one K-chunk per program, fp32.
       Skipped with one expert. Short and fully parallel: no program waits for a whole row.
    2. ``_decode_kernel``: program (n, s) takes BLOCK_N output rows and the s-th share of K, and
       reads those packed bytes once. It sums the logit partials and takes the softmax (G), mixes
       s_in = G @ scale_in on the fly and runs the product on the tensor cores, the (up to) 16
       tokens as the dot's M side. The signs are never unpacked through memory: a byte holds
       inputs 8g..8g+7, and instead of reshaping the bits (a layout change that would send a
       16-bit tile through shared memory) the step runs 8 "phases": phase j takes bit j of every
       byte of the tile (inline PTX turns 4 bytes into 4 16-bit +-1 in 6 instructions, the tile
       keeps its shape) against the activations at inputs 8g + j. The last program of a column
       block to finish sums the K shares and applies s_out = G @ scale_out and the bias.

one token (M == 1, rows of whole int32 words: ceil(in / 8) % 4 == 0; otherwise decode above)
    1. ``_router_kernel`` as above with 2048-input chunks (E > 1 and config ROUTER_INLINE=0 only).
    2. ``_gemv_kernel``: a sign-flip GEMV on the CUDA cores, no tensor cores. A packed row is read
       as int32 words, word c holding inputs 32c..32c+31; the scaled activations of a word are
       paired as 16 half2 registers (inputs 32c + i and 32c + i + 16), and per pair one shift puts
       weight bits i and i + 16 at the halves' sign bits and one lop3 flips the signs where the
       bit is 0 (_flip_sum_asm); the 16 pairs add as half2 in a tree, then in fp32. About 50
       instructions per 32 signs. Each program computes the activations of its K range once,
       reads the gates as scalars (no cross-thread reductions), and splits K as decode does.
       Optionally (config PDL=1, sm_90) launched as a programmatic dependent of the router, so that
       its weight loads start before the router has finished. With ROUTER_INLINE=1 (gemv_config's
       default up to in = GEMV_INLINE_ROUTER_MAX_K) there is no router launch: every program computes
       the whole token's logits itself (_inline_logits) while its first weights load, so the
       one-token path is one launch.

prefill (M > 16): the signs unpacked to memory, the product by cuBLAS
    1. ``_prep_kernel``: per PREP_BLOCK_M rows (prefill_config), the router logits over the whole
       input, the gates, and xs = x * s_in written once in x's dtype (rounded as the reference rounds it).
    2. per chunk of output rows (at most about UNPACK_MAX_ELEMENTS signs: one chunk for most layers,
       two for the paper's 5120 x 13824 either way): ``_unpack_kernel`` writes the signs as +-1 in
       x's dtype to a scratch tensor, and cuBLAS computes xs @ signs.T into those columns of y,
       rounded to x's dtype as the reference's matmul rounds it.
    3. ``_scale_output_kernel``: y = y * s_out + bias in place, the decode kernels' epilogue.
    In all 2 + 2 * chunks launches, each chunk's second one cuBLAS's.

Numbers follow the reference: s_in and s_out are rounded to x's dtype, x * s_in is rounded to
x's dtype, products accumulate in fp32 (for one token: 16-term partial sums in x's dtype first,
then fp32; measured against float64 in tests/test_kernels.py). Router logits stay fp32 (the reference rounds them to
x's dtype first), a difference far below the dtype's resolution after the softmax; for 2..16
tokens s_in is mixed in TF32 (see _mix_dot).

No host synchronisation and no data-dependent shapes: CUDA graphs capture every path, and under
torch.compile the layer is the opaque custom op ``binarymos::binary_mos_linear``. The split-K
arrival counts are one buffer per device, so two decode calls must not run concurrently on
different streams of one device.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DECODE_MAX_M = 16
ROUTER_BLOCK_K = 512  # inputs per program of the decode router launch
GEMV_ROUTER_BLOCK_K = 2048  # the same for one token: few partials, which every program of the GEMV sums
GEMV_INLINE_ROUTER_BLOCK_K = 2048  # inputs per step of the GEMV's own router loop (ROUTER_INLINE; config
# ROUTER_BLOCK_K): 10 16-byte loads in flight per thread of 4 warps; 4096 takes 132 registers (sm_90, E = 4)
GEMV_INLINE_ROUTER_MAX_K = 8192  # gemv_config computes the router inline up to this many inputs (measured, see there)
SPLIT_PROGRAMS, MAX_SPLIT = 1024, 16  # split-K programs to aim for (132 SMs on an H100); K splits at most
MAX_LOCKS = 1 << 16
_locks: dict[torch.device, torch.Tensor] = {}  # per device: one arrival count per decode column block
PREP_BLOCK_M, PREP_BLOCK_K = 1, 1024  # many short programs: the two passes over K are latency-bound
PREP_TILE = 4096  # elements of x per prep step: BLOCK_K shrinks as a config's PREP_BLOCK_M grows past 4
UNPACK_MAX_ELEMENTS = 1 << 26  # signs per unpacked chunk of the prefill (128 MB in 16 bits)
UNPACK_BLOCK_N, UNPACK_BLOCK_K = 32, 256  # output rows x inputs per _unpack_kernel program
SCALE_BLOCK_M, SCALE_BLOCK_N = 64, 64  # tokens x outputs per _scale_output_kernel program
NEG_ONE_BITS = {torch.float16: 0xBC00, torch.bfloat16: 0xBF80}  # -1.0; xor with 0x8000 gives +1.0


@triton.jit
def _softmax(logits, E: tl.constexpr, E_P: tl.constexpr):
    """Row softmax over the first E of E_P columns; padded columns get 0."""
    ce = tl.arange(0, E_P)
    logits = tl.where(ce[None, :] < E, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _partial_logits(x, router_ptr, rk, K, E: tl.constexpr, E_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """x (BLOCK_M, BLOCK_K) fp32 times router[:, rk].T -> (BLOCK_M, E_P) fp32."""
    ce = tl.arange(0, E_P)
    out = tl.zeros((BLOCK_M, E_P), tl.float32)
    for e in tl.static_range(E):
        r = tl.load(router_ptr + e * K + rk, mask=rk < K, other=0.0).to(tl.float32)
        out += tl.where(ce[None, :] == e, tl.sum(x * r[None, :], axis=1)[:, None], 0.0)
    return out


@triton.jit
def _gates(logits_ptr, rows, M, C, E: tl.constexpr, E_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """Softmax of the logits summed over their C partials, (C, M, E) fp32 -> (BLOCK_M, E_P).

    C = 0 (one expert, no router) leaves the logits at 0, so the single gate is 1.
    """
    ce = tl.arange(0, E_P)
    mask = (rows[:, None] < M) & (ce[None, :] < E)
    logits = tl.zeros((BLOCK_M, E_P), tl.float32)
    for c in range(C):
        logits += tl.load(logits_ptr + (c * M + rows[:, None]) * E + ce[None, :], mask=mask, other=0.0)
    return _softmax(logits, E, E_P)


@triton.jit
def _mix(gates, scale_ptr, idx, L, E: tl.constexpr, E_P: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_L: tl.constexpr):
    """The token's scale at positions idx: sum_e gates[:, e] * scale[e, idx], (BLOCK_M, BLOCK_L) fp32."""
    ce = tl.arange(0, E_P)
    out = tl.zeros((BLOCK_M, BLOCK_L), tl.float32)
    for e in tl.static_range(E):
        g = tl.sum(tl.where(ce[None, :] == e, gates, 0.0), axis=1)
        s = tl.load(scale_ptr + e * L + idx, mask=idx < L, other=0.0).to(tl.float32)
        out += g[:, None] * s[None, :]
    return out


@triton.jit
def _mix_dot(gates, scale_ptr, idx, L, E: tl.constexpr, E_P: tl.constexpr):
    """_mix for 16 rows on the tensor cores: gates (16, E_P >= 16, zero past E) @ scale[:E, idx].

    Written as FMAs, the mixing would be repeated by every warp of the program, because Triton
    computes it in the layout the phase dots consume. In TF32 the 16-bit scales are exact and only
    the gates round (relative 2^-11), so s_in lands within one 16-bit ulp of the fp32 mixture;
    3xTF32 would be exact but costs 1.8x the instructions per sign.
    """
    ce = tl.arange(0, E_P)
    s = tl.load(scale_ptr + ce[:, None] * L + idx[None, :], mask=(ce[:, None] < E) & (idx[None, :] < L), other=0.0)
    return tl.dot(gates, s.to(tl.float32), input_precision="tf32")


@triton.jit
def _scale(x, s, INTERPRET: tl.constexpr):
    """x * s in x's dtype: one rounding of the exact product, as the reference's 16-bit multiply.

    Under INTERPRET (Triton's CPU interpreter, which keeps bfloat16 as raw uint16 and gets 16-bit
    bfloat16 arithmetic and dots wrong) it is spelled in fp32: the same bits, the GPU way is faster.
    """
    if INTERPRET:
        return _round(x.to(tl.float32) * _round(s, x.dtype, True).to(tl.float32), x.dtype, True)
    return x * s.to(x.dtype)


@triton.jit
def _round(v, dt: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> 16 bits, to nearest even. The interpreter truncates fp32 -> bfloat16, so under
    INTERPRET that rounding is done on the bits (finite values only)."""
    if INTERPRET and dt == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(dt, bitcast=True)
    return v.to(dt)


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _store_output(acc, gates, s_out_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, E: tl.constexpr,
                  E_P: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """y = acc * s_out (+ bias), with s_out = G @ scale_out rounded to y's dtype as in the reference."""
    dt = y_ptr.dtype.element_ty
    s_out = _round(_mix(gates, s_out_ptr, rn, N, E, E_P, BLOCK_M, BLOCK_N), dt, INTERPRET).to(tl.float32)
    y = acc * s_out
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], _round(y, dt, INTERPRET),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _router_kernel(x_ptr, router_ptr, logits_ptr, M, K, stride_xm, E: tl.constexpr, E_P: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr = False):
    """logits[c, m, :] = x[m, chunk c] @ router[:, chunk c].T for the few decode tokens.

    LAUNCH_DEPENDENTS: let a kernel launched after this one with programmatic dependent launch
    start at once (it waits for these logits with griddepcontrol.wait)."""
    c = tl.program_id(0)
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    rm = tl.arange(0, BLOCK_M)
    rk = c * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                other=0.0).to(tl.float32)
    logits = _partial_logits(x, router_ptr, rk, K, E, E_P, BLOCK_M)
    ce = tl.arange(0, E_P)
    tl.store(logits_ptr + (c * M + rm[:, None]) * E + ce[None, :], logits,
             mask=(rm[:, None] < M) & (ce[None, :] < E))


@triton.jit
def _signs(w, j: tl.constexpr, NEG_ONE: tl.constexpr, like, INTERPRET: tl.constexpr):
    """+-1 in the dtype of ``like`` from bit j of each byte of w (uint8): bit j moved to the sign bit, xor -1.

    On the GPU four bytes at a time in one 32-bit register (inline PTX): two shifts put bit j of
    bytes 0 and 2, then of bytes 1 and 3, at bits 15 and 31; one lop3 each masks and xors; two
    prmt put the halves in element order. 1.5 instructions per sign, where Triton's per-element
    code (kept for the CPU interpreter, which cannot run PTX) takes about 4.
    """
    if INTERPRET:
        return (((w.to(tl.uint16) << (15 - j)) & 0x8000) ^ NEG_ONE).to(tl.uint16).to(like.dtype, bitcast=True)
    lo = tl.full(w.shape, 15 - j, tl.uint8)
    hi = tl.full(w.shape, 7 - j, tl.uint8)
    neg = tl.full(w.shape, NEG_ONE, tl.uint16)
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 s, t02, t13;
        and.b32 s, $3, 0xff;
        shl.b32 t02, $2, s;
        and.b32 s, $4, 0xff;
        shl.b32 t13, $2, s;
        lop3.b32 t02, t02, 0x80008000, $5, 0x6a;
        lop3.b32 t13, t13, 0x80008000, $5, 0x6a;
        prmt.b32 $0, t02, t13, 0x5410;
        prmt.b32 $1, t02, t13, 0x7632;
        }""",
        constraints="=r,=r,r,r,r,r,r", args=[w, lo, hi, neg], dtype=like.dtype, is_pure=True, pack=4)


@triton.jit
def _phase_dot(acc, xs, w, j: tl.constexpr, NEG_ONE: tl.constexpr, INTERPRET: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """acc += xs_j @ signs_j for phase j: xs_j (BLOCK_M, BLOCK_G) holds inputs 8g + j of the tile,
    repeated to the 16 rows a tensor-core dot needs (output row r is then token r % BLOCK_M)."""
    if BLOCK_M < 16:
        xs = tl.reshape(tl.broadcast_to(xs[None, :, :], (16 // BLOCK_M, BLOCK_M, BLOCK_G)), (16, BLOCK_G))
    return _dot(xs, _signs(w, j, NEG_ONE, xs, INTERPRET), acc, INTERPRET)


@triton.jit
def _release_fence(like, INTERPRET: tl.constexpr):
    """Every thread's earlier stores visible GPU-wide (CUDA's __threadfence) before the program
    signals its arrival; no-op in the interpreter, which runs programs one after another."""
    if not INTERPRET:
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,r", [like], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def _arrives_last(count_ptr, like, SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    """After a program stored its split-K partials: make them visible GPU-wide, count its arrival, and
    say whether it is the last of the SPLIT programs of its row block (which then sums the partials
    and resets the count to 0 for the next call or graph replay)."""
    _release_fence(like, INTERPRET)
    tl.debug_barrier()
    return tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == SPLIT - 1


@triton.jit
def _decode_kernel(x_ptr, w_ptr, logits_ptr, s_in_ptr, s_out_ptr, bias_ptr, y_ptr, partial_ptr, lock_ptr, M, N, K,
                   KB, C, stride_xm, stride_ym, STEPS, E: tl.constexpr, E_P: tl.constexpr, HAS_BIAS: tl.constexpr,
                   NEG_ONE: tl.constexpr, INTERPRET: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, PDL: tl.constexpr = False):
    """y[:M, n-block] for M <= BLOCK_M <= 16 tokens; each packed byte is read once (see the module doc).

    PDL: launched as the router's programmatic dependent (sm_90), so its launch overlaps the router's run;
    it waits for the router's grid before it reads anything.

    Program (n, s) covers STEPS steps of BLOCK_G packed bytes (8 * BLOCK_G inputs) from step s * STEPS.
    Per step the scaled activations are computed once, from contiguous loads, and split by phase
    (input 8g + j -> phase j = 4a + 2b + c) with register-level splits. With SPLIT > 1 programs
    leave fp32 partial sums; the last of a column block to arrive (an atomic count) adds them up,
    writes y and resets the count, so the next call, or graph replay, finds it at zero.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if PDL and not INTERPRET:
        tl.extra.cuda.gdc_wait()  # the router's logits are complete and visible from here on
    gates = _gates(logits_ptr, rm, M, C, E, E_P, BLOCK_M)  # E_P >= 16 when BLOCK_M == 16 (_mix_dot)
    acc = tl.zeros((16, BLOCK_N), tl.float32)
    g_start = pid_s * STEPS * BLOCK_G
    for g0 in range(g_start, min(KB, g_start + STEPS * BLOCK_G), BLOCK_G):
        rg = g0 + tl.arange(0, BLOCK_G)
        w = tl.load(w_ptr + rn[None, :] * KB + rg[:, None], mask=(rg[:, None] < KB) & (rn[None, :] < N), other=0)
        rk = g0 * 8 + tl.arange(0, 8 * BLOCK_G)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        if BLOCK_M == 16:
            s_in = _mix_dot(gates, s_in_ptr, rk, K, E, E_P)
        else:
            s_in = _mix(gates, s_in_ptr, rk, K, E, E_P, BLOCK_M, 8 * BLOCK_G)
        xs = _scale(x, s_in, INTERPRET)
        c0, c1 = tl.split(tl.reshape(xs, (BLOCK_M, BLOCK_G, 2, 2, 2)))
        c0b0, c0b1 = tl.split(c0)
        c1b0, c1b1 = tl.split(c1)
        x0, x4 = tl.split(c0b0)
        x2, x6 = tl.split(c0b1)
        x1, x5 = tl.split(c1b0)
        x3, x7 = tl.split(c1b1)
        acc = _phase_dot(acc, x0, w, 0, NEG_ONE, INTERPRET, BLOCK_M, BLOCK_G)
        acc = _phase_dot(acc, x1, w, 1, NEG_ONE, INTERPRET, BLOCK_M, BLOCK_G)
        acc = _phase_dot(acc, x2, w, 2, NEG_ONE, INTERPRET, BLOCK_M, BLOCK_G)
        acc = _phase_dot(acc, x3, w, 3, NEG_ONE, INTERPRET, BLOCK_M, BLOCK_G)
        acc = _phase_dot(acc, x4, w, 4, NEG_ONE, INTERPRET, BLOCK_M, BLOCK_G)
        acc = _phase_dot(acc, x5, w, 5, NEG_ONE, INTERPRET, BLOCK_M, BLOCK_G)
        acc = _phase_dot(acc, x6, w, 6, NEG_ONE, INTERPRET, BLOCK_M, BLOCK_G)
        acc = _phase_dot(acc, x7, w, 7, NEG_ONE, INTERPRET, BLOCK_M, BLOCK_G)
    # rows r and r + BLOCK_M hold the same token: max picks the value, exactly
    acc = tl.max(tl.reshape(acc, (16 // BLOCK_M, BLOCK_M, BLOCK_N)), axis=0)
    if SPLIT == 1:
        _store_output(acc, gates, s_out_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, E, E_P, HAS_BIAS, INTERPRET,
                      BLOCK_M, BLOCK_N)
    else:
        tile = partial_ptr + rm[:, None] * N + rn[None, :]
        tl.store(tile + pid_s * BLOCK_M * N, acc, mask=rn[None, :] < N)
        if _arrives_last(lock_ptr + pid_n, rm, SPLIT, INTERPRET):
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for s in range(SPLIT):
                acc += tl.load(tile + s * BLOCK_M * N, mask=rn[None, :] < N, other=0.0, cache_modifier=".cg")
            _store_output(acc, gates, s_out_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, E, E_P, HAS_BIAS,
                          INTERPRET, BLOCK_M, BLOCK_N)
            tl.atomic_xchg(lock_ptr + pid_n, 0)


# ---------------------------------------------------------------------------------------------------------------
# One token (M == 1): sign-flip GEMV on the CUDA cores.


def _flip_sum_asm(bf16: bool, terms: int) -> str:
    """PTX of _flip_sum: $0 (fp32) = sum over the 32 inputs of one packed word $1 of +-x, x from pairs $2..$17.

    Pair i holds the activations of inputs 32c + i (low half) and 32c + i + 16 (high half); shifting
    the word left by 15 - i puts its bits i and i + 16 at bits 15 and 31, the halves' sign bits, and
    one lop3 computes pair ^ (~(w << (15 - i)) & 0x80008000) (truth table (~a & b) ^ c = 0xA6): the
    activation with its sign flipped where the weight bit is 0. The 16 flipped pairs are summed as
    16-bit pairs in a tree of ``terms`` (16, 8, 4 or 2) leaves per partial sum (adjacent leaves
    first), each partial's halves converted to fp32 and added. bf16 pairs add as fma(a, 1.0, b),
    exactly a + b rounded once (add.bf16x2 needs sm_90, fma.bf16x2 sm_80), and convert to fp32 by
    moving the bits (a bf16 is the top half of the fp32 of the same value).
    """
    lines = ["{", ".reg .b32 t<16>, a, b, acc, one;", ".reg .b16 lo, hi;"]
    if bf16:
        lines.append("mov.b32 one, 0x3F803F80;")  # (1.0, 1.0)
    for i in range(16):
        if i == 15:
            lines.append("lop3.b32 t15, $1, 0x80008000, $17, 0xA6;")
        else:
            lines.append(f"shl.b32 t{i}, $1, {15 - i};")
            lines.append(f"lop3.b32 t{i}, t{i}, 0x80008000, ${i + 2}, 0xA6;")
    step = 1
    while step < terms:  # adjacent pairs first: t0 += t1, t2 += t3, ... then t0 += t2, ...
        for i in range(0, 16, 2 * step):
            if bf16:
                lines.append(f"fma.rn.bf16x2 t{i}, t{i}, one, t{i + step};")
            else:
                lines.append(f"add.rn.f16x2 t{i}, t{i}, t{i + step};")
        step *= 2
    for n, i in enumerate(range(0, 16, terms)):
        if bf16:
            lines.append(f"shl.b32 a, t{i}, 16;")
            lines.append(f"and.b32 b, t{i}, 0xFFFF0000;")
        else:
            lines.append(f"mov.b32 {{lo, hi}}, t{i};")
            lines.append("cvt.f32.f16 a, lo;")
            lines.append("cvt.f32.f16 b, hi;")
        lines.append("add.f32 acc, a, b;" if n == 0 else "add.f32 acc, acc, a;\nadd.f32 acc, acc, b;")
    lines += ["mov.b32 $0, acc;", "}"]
    return "\n".join(lines)


FLIP_SUM_ASM = {(bf16, terms): _flip_sum_asm(bf16, terms) for bf16 in (False, True) for terms in (2, 4, 8, 16)}


@triton.jit
def _pairs16(p):
    """(BLOCK_W, 16) -> its 16 columns as separate (BLOCK_W,) tensors, column order (register-level splits)."""
    BW: tl.constexpr = p.shape[0]
    e, o = tl.split(tl.reshape(p, (BW, 8, 2)))  # columns 2j, 2j + 1
    e0, e1 = tl.split(tl.reshape(e, (BW, 4, 2)))  # 4k, 4k + 2
    o0, o1 = tl.split(tl.reshape(o, (BW, 4, 2)))  # 4k + 1, 4k + 3
    a, b = tl.split(tl.reshape(e0, (BW, 2, 2)))  # 8l, 8l + 4
    c, d = tl.split(tl.reshape(e1, (BW, 2, 2)))  # 8l + 2, 8l + 6
    f, g = tl.split(tl.reshape(o0, (BW, 2, 2)))  # 8l + 1, 8l + 5
    h, i = tl.split(tl.reshape(o1, (BW, 2, 2)))  # 8l + 3, 8l + 7
    p0, p8 = tl.split(a)
    p4, p12 = tl.split(b)
    p2, p10 = tl.split(c)
    p6, p14 = tl.split(d)
    p1, p9 = tl.split(f)
    p5, p13 = tl.split(g)
    p3, p11 = tl.split(h)
    p7, p15 = tl.split(i)
    return p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15


@triton.jit
def _flip_tree(w, xs, shift: tl.constexpr, LOG_TERMS: tl.constexpr):
    """Interpreter version of half the PTX: +-xs[c, i] by bit shift + i of w, summed in 2**LOG_TERMS-leaf trees
    (adjacent leaves first, each level rounded to xs's dtype), the partial sums added in fp32."""
    BN: tl.constexpr = w.shape[0]
    BW: tl.constexpr = w.shape[1]
    bits = (w[:, :, None] >> (shift + tl.arange(0, 16))[None, None, :]) & 1
    v = xs.to(tl.float32)[None, :, :]
    t = tl.where(bits != 0, v, -v)
    for level in tl.static_range(LOG_TERMS):
        t = _round(tl.sum(tl.reshape(t, (BN, BW, 8 >> level, 2)), axis=3), xs.dtype, True).to(tl.float32)
    return tl.sum(t, axis=2)


@triton.jit
def _flip_sum(w, xs_lo, xs_hi, FLIP_ASM: tl.constexpr, LOG_TERMS: tl.constexpr, INTERPRET: tl.constexpr):
    """sum over the 32 inputs of each packed word of w (BLOCK_N, BLOCK_W) int32 of +-xs, (BLOCK_N, BLOCK_W) fp32.

    xs_lo, xs_hi (BLOCK_W, 16): the word's scaled activations in x's dtype, inputs 32c + i and
    32c + 16 + i. On the GPU one inline-PTX call per word (``FLIP_ASM``, see _flip_sum_asm), the
    activations packed as 16 pairs (packed where they were computed, then split into 16 tensors
    broadcast along the rows). The interpreter (no PTX) computes the same sums in the same order.
    """
    if INTERPRET:
        return (_flip_tree(w, xs_lo, 0, LOG_TERMS) + _flip_tree(w, xs_hi, 16, LOG_TERMS))
    lo = xs_lo.to(tl.uint16, bitcast=True).to(tl.uint32)
    hi = xs_hi.to(tl.uint16, bitcast=True).to(tl.uint32)
    p = (lo | (hi << 16)).to(tl.int32, bitcast=True)
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15 = _pairs16(p)
    return tl.inline_asm_elementwise(
        FLIP_ASM, "=f,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        [w, p0[None, :], p1[None, :], p2[None, :], p3[None, :], p4[None, :], p5[None, :], p6[None, :], p7[None, :],
         p8[None, :], p9[None, :], p10[None, :], p11[None, :], p12[None, :], p13[None, :], p14[None, :], p15[None, :]],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _summed_partials(logits_ptr, C, E: tl.constexpr, C_P: tl.constexpr):
    """The router logits of one token as a tuple of E fp32 scalars, summed from the router launch's
    C <= C_P partials (C, 1, E). Scalar loads, repeated by every thread: no cross-thread reduction."""
    logits = ()
    for e in tl.static_range(E):
        v = tl.load(logits_ptr + e)
        for c in tl.static_range(1, C_P):
            v += tl.load(logits_ptr + c * E + e, mask=c < C, other=0.0)
        logits = logits + (v,)
    return logits


@triton.jit
def _inline_logits(x_ptr, router_ptr, K, E: tl.constexpr, E_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """The router logits x @ router.T of one token over all K, computed by the calling program itself
    (ROUTER_INLINE: no router launch), as a tuple of E fp32 scalars.

    Each step loads BLOCK_K inputs of x and of the E router rows (20 kB at 2048 inputs and E = 4;
    from L2, or L1 once a program of the SM has read them), and each thread sums its products in
    groups of 8 consecutive inputs (its own 16-byte vectors when BLOCK_K >= 8 * threads: no data
    leaves the thread) into an (E_P, BLOCK_K / 8) fp32 tile. That tile is reduced across the program
    once, after the loop: one cross-thread reduction for all experts, where summing each step (as
    _partial_logits does for the router launch's single step) would add shuffles and a barrier per
    step. The steps run one after another, each about one L2 round trip, hence large steps. The E
    logits are then taken out of the reduced (E_P,) vector, which every thread holds whole (the
    load layout puts all threads along K).
    """
    ce = tl.arange(0, E_P)
    acc = tl.zeros((E_P, BLOCK_K // 8), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
        r = tl.load(router_ptr + ce[:, None] * K + rk[None, :], mask=(ce[:, None] < E) & (rk[None, :] < K), other=0.0)
        acc += tl.sum(tl.reshape(x[None, :] * r.to(tl.float32), (E_P, BLOCK_K // 8, 8)), axis=2)
    summed = tl.sum(acc, axis=1)
    logits = ()
    for e in tl.static_range(E):
        logits = logits + (tl.sum(tl.where(ce == e, summed, 0.0), axis=0),)
    return logits


@triton.jit
def _softmax_scalars(logits, E: tl.constexpr):
    """Softmax of a tuple of E fp32 scalars (the scalar form of _softmax), a tuple of E gates."""
    m = logits[0]
    for e in tl.static_range(1, E):
        m = tl.maximum(m, logits[e])
    p = ()
    total = 0.0
    for e in tl.static_range(E):
        pe = tl.exp(logits[e] - m)
        p = p + (pe,)
        total += pe
    gates = ()
    for e in tl.static_range(E):
        gates = gates + (p[e] / total,)
    return gates


@triton.jit
def _gemv_gates(x_ptr, router_ptr, logits_ptr, K, C, E: tl.constexpr, E_P: tl.constexpr, C_P: tl.constexpr,
                ROUTER_INLINE: tl.constexpr, ROUTER_BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                INTERPRET: tl.constexpr):
    """The softmax gates of one token as a tuple of E fp32 scalars, every thread holding them all.

    One expert: the single gate 1. ROUTER_INLINE: from the logits this program computes itself
    (_inline_logits). Otherwise from the router launch's partials, after waiting for the router's
    grid when this kernel was launched as its programmatic dependent (PDL); scalar loads and
    arithmetic, so no cross-thread reduction stands between the logits and the gates' first use.
    """
    gates = ()
    if E == 1:
        gates = (1.0,)
    elif ROUTER_INLINE:
        # a barrier, so that ptxas cannot sink the caller's first loads below the router loop (which it
        # did, to save registers, at ROUTER_BLOCK_K = 1024): they are to be in flight while it runs
        tl.debug_barrier()
        gates = _softmax_scalars(_inline_logits(x_ptr, router_ptr, K, E, E_P, ROUTER_BLOCK_K), E)
    else:
        if PDL and not INTERPRET:
            tl.extra.cuda.gdc_wait()  # the router's logits are complete and visible from here on
        gates = _softmax_scalars(_summed_partials(logits_ptr, C, E, C_P), E)
    return gates


@triton.jit
def _load_scales(scale_ptr, idx, L, E: tl.constexpr):
    """scale[e, idx] for each expert, a tuple of E tensors (zero where idx >= L)."""
    s = ()
    for e in tl.static_range(E):
        s = s + (tl.load(scale_ptr + e * L + idx, mask=idx < L, other=0.0),)
    return s


@triton.jit
def _mix_scalar(gates, s, E: tl.constexpr):
    """sum_e gates[e] * s[e] in fp32 (gates: a tuple of E scalars, s: of E tensors)."""
    out = gates[0] * s[0].to(tl.float32)
    for e in tl.static_range(1, E):
        out += gates[e] * s[e].to(tl.float32)
    return out


@triton.jit
def _gemv_step(acc, w, x_lo, x_hi, s_lo, s_hi, gates, E: tl.constexpr, FLIP_ASM: tl.constexpr,
               LOG_TERMS: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += the sign-flip sums of one step (see _flip_sum), the step's activations scaled once."""
    xs_lo = _scale(x_lo, _mix_scalar(gates, s_lo, E), INTERPRET)
    xs_hi = _scale(x_hi, _mix_scalar(gates, s_hi, E), INTERPRET)
    return acc + _flip_sum(w, xs_lo, xs_hi, FLIP_ASM, LOG_TERMS, INTERPRET)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, router_ptr, logits_ptr, s_in_ptr, s_out_ptr, bias_ptr, y_ptr, partial_ptr, lock_ptr, N,
                 K, KWA, C, STEPS, E: tl.constexpr, E_P: tl.constexpr, C_P: tl.constexpr, HAS_BIAS: tl.constexpr,
                 INTERPRET: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_W: tl.constexpr, W_ALIGN: tl.constexpr, FLIP_ASM: tl.constexpr, LOG_TERMS: tl.constexpr,
                 PDL: tl.constexpr, ROUTER_INLINE: tl.constexpr, ROUTER_BLOCK_K: tl.constexpr):
    """y[0, n-block] for one token: signs read as int32 words (KW per row), summed by sign flips (_flip_sum).

    Program (n, s) takes BLOCK_N rows and STEPS steps of BLOCK_W words from word s * STEPS * BLOCK_W.
    Everything the first step reads but the gates (its weights, activations, s_in and the
    program's s_out and bias) is requested first, so that those loads are in flight while the
    gates are obtained (_gemv_gates): with ROUTER_INLINE the program computes the token's logits
    over all K itself (x and router, ``router_ptr``; no router launch, ``logits_ptr`` unread);
    otherwise it sums the router launch's C logit partials (``logits_ptr``), with PDL
    (programmatic dependent launch after the router) only then waiting for the router's grid.
    Each step computes its 32 * BLOCK_W scaled activations once and flips them against the words
    of each row; later steps loop. With SPLIT > 1 the K shares meet as in _decode_kernel: fp32
    partials, a fence, an arrival count; the last to arrive sums them (one tile load), applies
    s_out and the bias, and resets the count.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    KW = KWA * W_ALIGN  # words per row; W_ALIGN (a power of two dividing it) lets the loads vectorize
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_start = pid_s * STEPS * BLOCK_W
    w_end = tl.minimum(KW, w_start + STEPS * BLOCK_W)
    rw = w_start + tl.arange(0, BLOCK_W)
    w = tl.load(w_ptr + rn[:, None] * KW + rw[None, :], mask=(rn[:, None] < N) & (rw[None, :] < w_end), other=0)
    rk = w_start * 32 + tl.arange(0, BLOCK_W)[:, None] * 32 + tl.arange(0, 16)[None, :]  # inputs 32c + i
    x_lo = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
    x_hi = tl.load(x_ptr + rk + 16, mask=rk + 16 < K, other=0.0)
    s_lo = _load_scales(s_in_ptr, rk, K, E)
    s_hi = _load_scales(s_in_ptr, rk + 16, K, E)
    s_out = _load_scales(s_out_ptr, rn, N, E)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    gates = _gemv_gates(x_ptr, router_ptr, logits_ptr, K, C, E, E_P, C_P, ROUTER_INLINE, ROUTER_BLOCK_K, PDL,
                        INTERPRET)
    acc = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
    for w0 in range(w_start, w_end, BLOCK_W):  # the next step's loads are issued before this step's sums
        w_now, xl_now, xh_now, sl_now, sh_now = w, x_lo, x_hi, s_lo, s_hi
        if w0 + BLOCK_W < w_end:
            rw += BLOCK_W
            rk += 32 * BLOCK_W
            w = tl.load(w_ptr + rn[:, None] * KW + rw[None, :], mask=(rn[:, None] < N) & (rw[None, :] < w_end),
                        other=0)
            x_lo = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
            x_hi = tl.load(x_ptr + rk + 16, mask=rk + 16 < K, other=0.0)
            s_lo = _load_scales(s_in_ptr, rk, K, E)
            s_hi = _load_scales(s_in_ptr, rk + 16, K, E)
        acc = _gemv_step(acc, w_now, xl_now, xh_now, sl_now, sh_now, gates, E, FLIP_ASM, LOG_TERMS, INTERPRET)
    out = tl.sum(acc, axis=1)
    s_out = _mix_scalar(gates, s_out, E)
    if SPLIT > 1:
        tl.store(partial_ptr + pid_s * N + rn, out, mask=rn < N)
        if _arrives_last(lock_ptr + pid_n, rn, SPLIT, INTERPRET):
            rs = tl.arange(0, SPLIT_P)
            part = tl.load(partial_ptr + rs[:, None] * N + rn[None, :],
                           mask=(rs[:, None] < SPLIT) & (rn[None, :] < N), other=0.0, cache_modifier=".cg")
            _gemv_store(tl.sum(part, axis=0), s_out, bias, y_ptr, rn, N, INTERPRET)
            tl.atomic_xchg(lock_ptr + pid_n, 0)
    else:
        _gemv_store(out, s_out, bias, y_ptr, rn, N, INTERPRET)


@triton.jit
def _gemv_store(out, s_out, bias, y_ptr, rn, N, INTERPRET: tl.constexpr):
    """y = out * s_out + bias, s_out rounded to y's dtype as in the reference (as _store_output)."""
    dt = y_ptr.dtype.element_ty
    y = out * _round(s_out, dt, INTERPRET).to(tl.float32) + bias
    tl.store(y_ptr + rn, _round(y, dt, INTERPRET), mask=rn < N)


@triton.jit
def _prep_kernel(x_ptr, router_ptr, s_in_ptr, logits_ptr, xs_ptr, M, K, stride_xm, E: tl.constexpr,
                 E_P: tl.constexpr, HAS_ROUTER: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """For BLOCK_M rows: logits (stored for _scale_output_kernel), gates, and xs = x * s_in."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ce = tl.arange(0, E_P)
    logits = tl.zeros((BLOCK_M, E_P), tl.float32)
    if HAS_ROUTER:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0).to(tl.float32)
            logits += _partial_logits(x, router_ptr, rk, K, E, E_P, BLOCK_M)
        tl.store(logits_ptr + rm[:, None] * E + ce[None, :], logits, mask=(rm[:, None] < M) & (ce[None, :] < E))
    gates = _softmax(logits, E, E_P)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0)
        xs = _scale(x, _mix(gates, s_in_ptr, rk, K, E, E_P, BLOCK_M, BLOCK_K), INTERPRET)
        tl.store(xs_ptr + rm[:, None] * K + rk[None, :], xs, mask=mask)


@triton.jit
def _unpack_kernel(w_ptr, signs_ptr, N, K, KB, NEG_ONE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """signs (N, K) = the packed rows (N, KB) as +-1 in signs' dtype, for the prefill's cuBLAS product.

    Bit j of each byte moved to the sign bit of input 8g + j, xor -1 (BLOCK_K a multiple of 8); the
    inputs past K, unpacked from padding bits or zero bytes, are not stored."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    rg = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    w = tl.load(w_ptr + rn[:, None] * KB + rg[None, :], mask=(rn[:, None] < N) & (rg[None, :] < KB), other=0)
    shifts = 15 - tl.arange(0, 8).to(tl.uint16)
    bits = ((w.to(tl.uint16)[:, :, None] << shifts[None, None, :]) & 0x8000) ^ NEG_ONE
    signs = tl.reshape(bits.to(tl.uint16), (BLOCK_N, BLOCK_K)).to(signs_ptr.dtype.element_ty, bitcast=True)
    tl.store(signs_ptr + rn[:, None] * K + rk[None, :], signs, mask=(rn[:, None] < N) & (rk[None, :] < K))


@triton.jit
def _scale_output_kernel(y_ptr, logits_ptr, s_out_ptr, bias_ptr, M, N, C, stride_ym, E: tl.constexpr,
                         E_P: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """In place, y = y * s_out (+ bias) for a tile of the cuBLAS product (already in y's dtype)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.load(y_ptr + rm[:, None] * stride_ym + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N),
                  other=0.0).to(tl.float32)
    gates = _gates(logits_ptr, rm, M, C, E, E_P, BLOCK_M)
    _store_output(acc, gates, s_out_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, E, E_P, HAS_BIAS, INTERPRET,
                  BLOCK_M, BLOCK_N)


def decode_config(M: int, N: int, K: int) -> dict:
    """Tile of the decode kernel (tuned on an H100 at the paper's shapes; docs/KERNELS.md); PDL=1: launched as the
    router's programmatic dependent on sm_90."""
    return {"BLOCK_N": 32 if M == 1 else 64, "BLOCK_G": 64 if M == 1 else 32, "num_warps": 4, "num_stages": 2, "PDL": 1}


def k_split(N: int, block_n: int, k_steps: int) -> int:
    """How many programs share a row block's ``k_steps`` steps of K (decode and one-token kernels alike).

    One program per row block leaves each SM a few warps that wait on their own dependent
    instructions (measured 13 us for 4096 x 4096 at M = 1, where the instruction count allows ~2);
    splitting K raises the programs to about SPLIT_PROGRAMS, each with at least one step.
    """
    n_blocks = triton.cdiv(N, block_n)
    if n_blocks > MAX_LOCKS:
        return 1
    split = max(1, min(k_steps, SPLIT_PROGRAMS // n_blocks, MAX_SPLIT))
    return triton.cdiv(k_steps, triton.cdiv(k_steps, split))  # no program left without a step


def gemv_config(N: int, K: int, dtype: torch.dtype) -> dict:
    """Tile of the one-token sign-flip kernel (_gemv_kernel): 128 rows x 32 words on 4 warps (1.8
    lane-instructions per sign in the step, 2.2 for the whole program, 128 registers: 4 programs an SM;
    benchmarks/sass_report.py), 64 rows where that leaves fewer than two programs an SM. On an H100,
    without PDL, it was within 2 us of the best of 11 tiles x PDL on/off at every paper shape
    (benchmarks/linear_latency.py --sweep, docs/KERNELS.md). TERMS: leaves per 16-bit partial sum.

    The router (E > 1; ignored for E = 1), a key missing from a config counting as 0:
    ROUTER_INLINE=1: no router launch; every GEMV program computes the token's logits over all K
    itself (_inline_logits, ROUTER_BLOCK_K inputs a step, default GEMV_INLINE_ROUTER_BLOCK_K), so the
    one-token path is one launch. The default up to K = GEMV_INLINE_ROUTER_MAX_K: in the sweep on an H100
    (CUDA graph, best tile of each way, docs/KERNELS.md session 7) inline was 1.1-1.9 us faster at K = 4096
    and 5120 (7.3 against 9.2 us at 4096 x 4096) and equal at 5120 -> 13824, but no faster at K = 11008 (13.9
    against 13.8) and 3.8 us slower at K = 13824: every program reads (E + 1) * K 16-bit values and executes
    ~14 lane-instructions per input at E = 4 (sm_90 SASS: 221 per 2048-input step and thread), which long
    rows pay on top of the flips' own issue floor.
    ROUTER_INLINE=0: the router's logit partials in a launch of their own (_router_kernel), and with
    PDL=1 the GEMV launched as its programmatic dependent (sm_90; in the sweep above up to 2.5 us
    faster than without, at worst 0.3 us slower).

    BINARYMOS_GEMV_CONFIG="BLOCK_N=..,BLOCK_W=..,num_warps=..,ROUTER_INLINE=1" (ints) replaces it
    (GPU sweeps and end-to-end runs)."""
    env = os.environ.get("BINARYMOS_GEMV_CONFIG")
    if env:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in env.split(",") if item.strip())}
    kw = triton.cdiv(triton.cdiv(K, 8), 4)
    block_n = 128 if triton.cdiv(N, 128) * k_split(N, 128, triton.cdiv(kw, 32)) >= 2 * 132 else 64
    return {"BLOCK_N": block_n, "BLOCK_W": 32, "num_warps": 4, "num_stages": 1, "TERMS": 16,
            "ROUTER_INLINE": int(K <= GEMV_INLINE_ROUTER_MAX_K), "PDL": 1}


GEMV_SWEEP = [dict(BLOCK_N=n, BLOCK_W=w, num_warps=nw, num_stages=1) for n, w, nw in
              [(32, 32, 4), (64, 32, 4), (128, 32, 4), (128, 32, 8), (256, 32, 8), (64, 64, 4), (128, 64, 8),
               (128, 16, 4), (256, 16, 8), (64, 128, 4), (128, 128, 8)]]  # tiles compiled offline (sass_report)


def gemv_applies(packed_weight: torch.Tensor) -> bool:
    """The packed rows can be read as int32 words: whole words per row, 4-byte aligned, contiguous."""
    N, KB = packed_weight.shape
    return (KB % 4 == 0 and packed_weight.stride(1) == 1 and packed_weight.stride(0) == KB
            and packed_weight.data_ptr() % 4 == 0)


def _locks_for(device) -> torch.Tensor:
    if device not in _locks:  # zeroed once; each call leaves its counts at zero again
        _locks[device] = torch.zeros(MAX_LOCKS, device=device, dtype=torch.int32)
    return _locks[device]


def gemv_launches(x2, packed_weight, router, scale_in, scale_out, bias, y, cfg, interpret) -> list[tuple]:
    """The one-token path as (kernel, grid, args, kwargs) launches: with ROUTER_INLINE (cfg, see
    gemv_config) or one expert the sign-flip GEMV alone, which computes the gates itself; otherwise
    the router's logit partials, then the GEMV (with PDL=1 on sm_90 as the router's programmatic
    dependent). ``bias`` None or the bias; ``y`` (1, N) receives the result.
    benchmarks/sass_report.py compiles the same launches offline."""
    N, KB = packed_weight.shape
    K, KW, E = x2.shape[1], KB // 4, scale_in.shape[0]
    E_P = triton.next_power_of_2(E)
    cfg = dict(cfg)
    terms = cfg.pop("TERMS", 16)
    inline = bool(cfg.pop("ROUTER_INLINE", 0))
    router_block_k = cfg.pop("ROUTER_BLOCK_K", GEMV_INLINE_ROUTER_BLOCK_K)
    router_launch = E > 1 and not inline
    # PDL only behind the router launch: the GEMV reads x before griddepcontrol.wait, which is safe because
    # the router itself started only after x's producer had finished; behind the producer itself (E = 1
    # or the router inline) those reads could see x unfinished
    pdl = (bool(cfg.pop("PDL", False)) and router_launch and not interpret and x2.is_cuda
           and torch.cuda.get_device_capability(x2.device)[0] >= 9)  # griddepcontrol: sm_90
    split = cfg.pop("SPLIT", None) or k_split(N, cfg["BLOCK_N"], triton.cdiv(KW, cfg["BLOCK_W"]))
    steps = triton.cdiv(triton.cdiv(KW, cfg["BLOCK_W"]), split)
    launches = []
    logits, C = y, 0  # an unread placeholder pointer without a router launch
    if router_launch:
        C = triton.cdiv(K, GEMV_ROUTER_BLOCK_K)
        logits = torch.empty((C, 1, E), device=x2.device, dtype=torch.float32)
        launches.append((_router_kernel, (C,), (x2, router, logits, 1, K, x2.stride(0)),
                         dict(E=E, E_P=E_P, BLOCK_M=1, BLOCK_K=GEMV_ROUTER_BLOCK_K, LAUNCH_DEPENDENTS=pdl)))
    partial, locks = y, y
    if split > 1:
        partial = torch.empty((split, N), device=x2.device, dtype=torch.float32)
        locks = _locks_for(x2.device)
    w_align = 4 if KW % 4 == 0 else 2 if KW % 2 == 0 else 1
    if pdl:
        cfg["launch_pdl"] = True
    launches.append((_gemv_kernel, (triton.cdiv(N, cfg["BLOCK_N"]), split),
                     (x2, packed_weight.view(torch.int32), router if E > 1 else y, logits, scale_in, scale_out,
                      y if bias is None else bias, y, partial, locks, N, K, KW // w_align, C, steps),
                     dict(E=E, E_P=E_P, C_P=max(1, triton.next_power_of_2(C)), HAS_BIAS=bias is not None,
                          INTERPRET=interpret, SPLIT=split, W_ALIGN=w_align,
                          FLIP_ASM=FLIP_SUM_ASM[(x2.dtype == torch.bfloat16, terms)], LOG_TERMS=terms.bit_length() - 1,
                          SPLIT_P=triton.next_power_of_2(split), PDL=pdl, ROUTER_INLINE=E > 1 and inline,
                          ROUTER_BLOCK_K=router_block_k, **cfg)))
    return launches


def prefill_config() -> dict:
    """The prefill's one setting: PREP_BLOCK_M, the rows per program of _prep_kernel (1 and 4 measured
    within noise on an H100; benchmarks/linear_latency.py --sweep times the others)."""
    return {"PREP_BLOCK_M": PREP_BLOCK_M}


def _unpacked_rows(N: int, K: int) -> int:
    """Output rows per chunk of the prefill: equal chunks of at most about UNPACK_MAX_ELEMENTS
    signs, a multiple of 8 rows, so that each chunk's columns of y start 16-byte aligned when N is."""
    chunks = triton.cdiv(N * K, UNPACK_MAX_ELEMENTS)
    return min(N, 8 * triton.cdiv(triton.cdiv(N, chunks), 8))


def _prefill(x2, packed_weight, router, scale_in, scale_out, bias, y, cfg, common, interpret):
    """y (M, N) for M > 16 tokens: prep, unpack + cuBLAS per chunk, scale (see the module doc).
    ``bias`` is the bias or an unread placeholder pointer."""
    M, K = x2.shape
    N, KB = packed_weight.shape
    prep_block_m = cfg["PREP_BLOCK_M"]
    xs = torch.empty((M, K), device=x2.device, dtype=x2.dtype)
    logits = torch.empty((1, M, common["E"]), device=x2.device, dtype=torch.float32)
    has_router = common["E"] > 1
    _prep_kernel[(triton.cdiv(M, prep_block_m),)](
        x2, router if has_router else x2, scale_in, logits, xs, M, K, x2.stride(0), E=common["E"], E_P=common["E_P"],
        HAS_ROUTER=has_router, INTERPRET=interpret, BLOCK_M=prep_block_m,
        BLOCK_K=min(PREP_BLOCK_K, PREP_TILE // prep_block_m))
    rows = _unpacked_rows(N, K)
    signs = torch.empty((rows, K), device=x2.device, dtype=x2.dtype)
    for n0 in range(0, N, rows):
        n = min(rows, N - n0)
        _unpack_kernel[(triton.cdiv(n, UNPACK_BLOCK_N), triton.cdiv(K, UNPACK_BLOCK_K))](
            packed_weight[n0:], signs, n, K, KB, NEG_ONE=NEG_ONE_BITS[x2.dtype], BLOCK_N=UNPACK_BLOCK_N,
            BLOCK_K=UNPACK_BLOCK_K)
        torch.mm(xs, signs[:n].T, out=y[:, n0:n0 + n])  # a strided view of y, which cuBLAS writes directly
    _scale_output_kernel[(triton.cdiv(M, SCALE_BLOCK_M), triton.cdiv(N, SCALE_BLOCK_N))](
        y, logits, scale_out, bias, M, N, int(has_router), y.stride(0), INTERPRET=interpret, BLOCK_M=SCALE_BLOCK_M,
        BLOCK_N=SCALE_BLOCK_N, **common)


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (TRITON_INTERPRET=1): no PTX, bf16 rounded by hand."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch(x, packed_weight, router, scale_in, scale_out, bias, config=None, out=None):
    in_features = x.shape[-1]
    N, KB = packed_weight.shape
    E = scale_in.shape[0]
    if x.dtype not in NEG_ONE_BITS:
        raise TypeError(f"binary_mos_linear runs in float16 or bfloat16, got {x.dtype}")
    if E > 1 and router is None:
        raise ValueError(f"a layer with {E} experts needs its router")
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if out is None else out.view(M, N)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    interpret = interpreting()
    common = dict(E=E, E_P=triton.next_power_of_2(E), HAS_BIAS=bias is not None)
    if M == 1 and gemv_applies(packed_weight) and (config is None or "BLOCK_W" in config):
        for kernel, grid, args, kwargs in gemv_launches(x2, packed_weight, router, scale_in, scale_out, bias, y,
                                                        config or gemv_config(N, in_features, x.dtype), interpret):
            kernel[grid](*args, **kwargs)
        return y.reshape(*x.shape[:-1], N)
    bias = y if bias is None else bias  # an unread placeholder pointer when there is no bias
    if M <= DECODE_MAX_M:
        cfg = dict(config if config and "BLOCK_G" in config else decode_config(M, N, in_features))
        logits, C = y, 0
        pdl = (bool(cfg.pop("PDL", 0)) and E > 1 and not interpret and x.is_cuda
               and torch.cuda.get_device_capability(x.device)[0] >= 9)  # griddepcontrol: sm_90
        if E > 1:
            C = triton.cdiv(in_features, ROUTER_BLOCK_K)
            logits = torch.empty((C, M, E), device=x.device, dtype=torch.float32)
            _router_kernel[(C,)](x2, router, logits, M, in_features, x2.stride(0), E=E, E_P=common["E_P"],
                                 BLOCK_M=DECODE_MAX_M, BLOCK_K=ROUTER_BLOCK_K, LAUNCH_DEPENDENTS=pdl)
        if pdl:
            cfg.update(PDL=True, launch_pdl=True)
        block_m = 1 if M == 1 else 16  # one token: plain FMAs; more: 16 rows, mixed on the tensor cores
        n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
        split = cfg.pop("SPLIT", None) or k_split(N, cfg["BLOCK_N"], triton.cdiv(KB, cfg["BLOCK_G"]))
        steps = triton.cdiv(triton.cdiv(KB, cfg["BLOCK_G"]), split)
        partial, locks = y, y
        if split > 1:
            partial = torch.empty((split, block_m, N), device=x.device, dtype=torch.float32)
            locks = _locks_for(x.device)
        _decode_kernel[(n_blocks, split)](
            x2, packed_weight, logits, scale_in, scale_out, bias, y, partial, locks, M, N, in_features, KB, C,
            x2.stride(0), y.stride(0), steps, NEG_ONE=NEG_ONE_BITS[x.dtype], INTERPRET=interpret, SPLIT=split,
            BLOCK_M=block_m, **dict(common, E_P=common["E_P"] if M == 1 else max(16, common["E_P"])), **cfg)
    else:
        cfg = config if config and "PREP_BLOCK_M" in config else prefill_config()
        _prefill(x2, packed_weight, router, scale_in, scale_out, bias, y, cfg, common, interpret)
    return y.reshape(*x.shape[:-1], N)


@torch.library.custom_op("binarymos::binary_mos_linear", mutates_args=())
def _binary_mos_linear_op(x: torch.Tensor, packed_weight: torch.Tensor, router: torch.Tensor | None,
                          scale_in: torch.Tensor, scale_out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _launch(x, packed_weight, router, scale_in, scale_out, bias)


@_binary_mos_linear_op.register_fake
def _(x, packed_weight, router, scale_in, scale_out, bias):
    return x.new_empty((*x.shape[:-1], packed_weight.shape[0]))


def binary_mos_linear_triton(x, packed_weight, router, scale_in, scale_out, bias=None, config=None, out=None):
    """The Triton path. ``config`` overrides the tile choice and ``out`` (contiguous, x's dtype)
    receives the result; the benchmarks use both. Under torch.compile the call goes through the
    custom op, so that the graph stays whole."""
    if torch.compiler.is_compiling():
        return _binary_mos_linear_op(x, packed_weight, router, scale_in, scale_out, bias)
    return _launch(x, packed_weight, router, scale_in, scale_out, bias, config, out)
