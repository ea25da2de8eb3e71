"""Triton kernels for the packed BinaryMoS layer (design and measurements: docs/KERNELS.md).

Two paths, each two launches at most:

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

prefill (M > 16)
    1. ``_prep_kernel``: per row, the router logits over the whole input, the gates, and
       xs = x * s_in written once in x's dtype (rounded as the reference rounds it).
    2. ``_prefill_kernel``: a tiled GEMM over xs, computed transposed so that the signs, unpacked
       from the packed bytes in registers, are the register operand of Hopper's wgmma; same epilogue.

Numbers follow the reference: s_in and s_out are rounded to x's dtype, x * s_in is rounded to
x's dtype, products accumulate in fp32. Router logits stay fp32 (the reference rounds them to
x's dtype first), a difference far below the dtype's resolution after the softmax; for 2..16
tokens s_in is mixed in TF32 (see _mix_dot).

No host synchronisation and no data-dependent shapes: CUDA graphs capture both paths, and under
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
DECODE_PROGRAMS, MAX_SPLIT = 1024, 16  # decode programs to aim for (132 SMs on an H100); K splits at most
MAX_LOCKS = 1 << 16
_locks: dict[torch.device, torch.Tensor] = {}  # per device: one arrival count per decode column block
PREP_BLOCK_M, PREP_BLOCK_K = 1, 1024  # many short programs: the two passes over K are latency-bound
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
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], _round(y, dt, INTERPRET), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _router_kernel(x_ptr, router_ptr, logits_ptr, M, K, stride_xm, E: tl.constexpr, E_P: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """logits[c, m, :] = x[m, chunk c] @ router[:, chunk c].T for the few decode tokens."""
    c = tl.program_id(0)
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
def _decode_kernel(x_ptr, w_ptr, logits_ptr, s_in_ptr, s_out_ptr, bias_ptr, y_ptr, partial_ptr, lock_ptr, M, N, K,
                   KB, C, stride_xm, stride_ym, STEPS, E: tl.constexpr, E_P: tl.constexpr, HAS_BIAS: tl.constexpr,
                   NEG_ONE: tl.constexpr, INTERPRET: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """y[:M, n-block] for M <= BLOCK_M <= 16 tokens; each packed byte is read once (see the module doc).

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
        _release_fence(rm, INTERPRET)
        tl.debug_barrier()
        if tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for s in range(SPLIT):
                acc += tl.load(tile + s * BLOCK_M * N, mask=rn[None, :] < N, other=0.0, cache_modifier=".cg")
            _store_output(acc, gates, s_out_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, E, E_P, HAS_BIAS,
                          INTERPRET, BLOCK_M, BLOCK_N)
            tl.atomic_xchg(lock_ptr + pid_n, 0)


@triton.jit
def _prep_kernel(x_ptr, router_ptr, s_in_ptr, logits_ptr, xs_ptr, M, K, stride_xm, E: tl.constexpr,
                 E_P: tl.constexpr, HAS_ROUTER: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """For BLOCK_M rows: logits (stored for the GEMM's epilogue), gates, and xs = x * s_in."""
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
def _prefill_kernel(xs_ptr, w_ptr, logits_ptr, s_out_ptr, bias_ptr, y_ptr, M, N, K, KB, C, stride_ym,
                    E: tl.constexpr, E_P: tl.constexpr, HAS_BIAS: tl.constexpr, NEG_ONE: tl.constexpr,
                    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """One (BLOCK_M tokens, BLOCK_N outputs) tile of y = ((xs @ B.T) * s_out + bias).

    Computed transposed, acc (BLOCK_N, BLOCK_M) = signs @ xs.T: Hopper's wgmma takes its first
    operand from registers, so the signs unpacked there feed the tensor cores directly, while xs
    streams through shared memory in Triton's pipelined async copies. (With the signs second,
    they would be written to shared memory every step and the loop would not pipeline.)
    """
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)  # GROUP_M token blocks walk the same weight columns, from L2
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    shifts = 15 - tl.arange(0, 8).to(tl.uint16)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xs_t = tl.load(xs_ptr + rm[None, :] * K + rk[:, None], mask=(rm[None, :] < M) & (rk[:, None] < K), other=0.0)
        rg = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        w = tl.load(w_ptr + rn[:, None] * KB + rg[None, :], mask=(rn[:, None] < N) & (rg[None, :] < KB), other=0)
        bits = ((w.to(tl.uint16)[:, :, None] << shifts[None, None, :]) & 0x8000) ^ NEG_ONE
        signs = tl.reshape(bits.to(tl.uint16), (BLOCK_N, BLOCK_K)).to(xs_t.dtype, bitcast=True)
        acc = _dot(signs, xs_t, acc, INTERPRET)
    gates = _gates(logits_ptr, rm, M, C, E, E_P, BLOCK_M)
    _store_output(tl.trans(acc), gates, s_out_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, E, E_P, HAS_BIAS,
                  INTERPRET, BLOCK_M, BLOCK_N)


def decode_config(M: int, N: int, K: int) -> dict:
    """Tile of the decode kernel (tuned on an H100 at the paper's shapes; docs/KERNELS.md)."""
    return {"BLOCK_N": 32 if M == 1 else 64, "BLOCK_G": 64 if M == 1 else 32, "num_warps": 4, "num_stages": 2}


def decode_split(N: int, K: int, block_n: int, block_g: int) -> int:
    """How many programs share a column block's K.

    One program per column block leaves each SM a few warps that wait on their own dependent
    instructions (measured 13 us for 4096 x 4096 at M = 1, where the instruction count allows ~2);
    splitting K raises the programs to about DECODE_PROGRAMS, each with at least one step.
    """
    n_blocks, k_steps = triton.cdiv(N, block_n), triton.cdiv(triton.cdiv(K, 8), block_g)
    if n_blocks > MAX_LOCKS:
        return 1
    split = max(1, min(k_steps, DECODE_PROGRAMS // n_blocks, MAX_SPLIT))
    return triton.cdiv(k_steps, triton.cdiv(k_steps, split))  # no program left without a step


def prefill_config(M: int, N: int, K: int) -> dict:
    return {"BLOCK_M": 256 if M >= 1024 else 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
            "num_stages": 4 if M >= 1024 else 3}


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
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # Triton's CPU interpreter
    common = dict(E=E, E_P=triton.next_power_of_2(E), HAS_BIAS=bias is not None)
    bias = y if bias is None else bias  # an unread placeholder pointer when there is no bias
    if M <= DECODE_MAX_M:
        cfg = dict(config or decode_config(M, N, in_features))
        logits, C = y, 0
        if E > 1:
            C = triton.cdiv(in_features, ROUTER_BLOCK_K)
            logits = torch.empty((C, M, E), device=x.device, dtype=torch.float32)
            _router_kernel[(C,)](x2, router, logits, M, in_features, x2.stride(0), E=E, E_P=common["E_P"],
                                 BLOCK_M=DECODE_MAX_M, BLOCK_K=ROUTER_BLOCK_K)
        block_m = 1 if M == 1 else 16  # one token: plain FMAs; more: 16 rows, mixed on the tensor cores
        n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
        split = cfg.pop("SPLIT", None) or decode_split(N, in_features, cfg["BLOCK_N"], cfg["BLOCK_G"])
        steps = triton.cdiv(triton.cdiv(KB, cfg["BLOCK_G"]), split)
        partial, locks = y, y
        if split > 1:
            partial = torch.empty((split, block_m, N), device=x.device, dtype=torch.float32)
            if x.device not in _locks:  # zeroed once; each call leaves its counts at zero again
                _locks[x.device] = torch.zeros(MAX_LOCKS, device=x.device, dtype=torch.int32)
            locks = _locks[x.device]
        _decode_kernel[(n_blocks, split)](
            x2, packed_weight, logits, scale_in, scale_out, bias, y, partial, locks, M, N, in_features, KB, C,
            x2.stride(0), y.stride(0), steps, NEG_ONE=NEG_ONE_BITS[x.dtype], INTERPRET=interpret, SPLIT=split,
            BLOCK_M=block_m, **dict(common, E_P=common["E_P"] if M == 1 else max(16, common["E_P"])), **cfg)
    else:
        cfg = dict(config or prefill_config(M, N, in_features))
        xs = torch.empty((M, in_features), device=x.device, dtype=x.dtype)
        logits = torch.empty((1, M, E), device=x.device, dtype=torch.float32)
        has_router = E > 1
        _prep_kernel[(triton.cdiv(M, PREP_BLOCK_M),)](
            x2, router if has_router else x2, scale_in, logits, xs, M, in_features, x2.stride(0), E=E,
            E_P=common["E_P"], HAS_ROUTER=has_router, INTERPRET=interpret, BLOCK_M=PREP_BLOCK_M, BLOCK_K=PREP_BLOCK_K)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _prefill_kernel[grid](xs, packed_weight, logits, scale_out, bias, y, M, N, in_features, KB, int(has_router),
                              y.stride(0), NEG_ONE=NEG_ONE_BITS[x.dtype], INTERPRET=interpret, **common, **cfg)
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
