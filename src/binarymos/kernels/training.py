"""Triton kernels for training BinaryMoSLinear: the per-token scaling and its gradients in one pass each.

The layer's products are cuBLAS's; what is left is elementwise work over every token's row, which
autograd spells as a dozen launches with full-size intermediates (s_in, x * s_in, s_out, dy * z, ...).
Here each row pass reads its inputs once:

    _scale_rows_kernel           out = a * (G @ S) + bias                  (x * s_in, and z * s_out + bias)
    _scale_rows_backward_kernel  grad_a = grad * (G @ S)                   (the gradient through the scaling)
                                 grad_G partials = (grad * saved) @ S.T   (per column block; summed by the caller)
                                 grad_S partials = G.T @ (grad * saved)   (per row block; summed by the caller)

    _signs_kernel                signs = +-1 of the latent weights, in the products' dtype
    _ste_gradient_kernel         d weight = d signs where |weight| <= clip, else 0 (the straight-through sign)
    _gates_backward_kernel       d logits = G * (d G - sum_e G d G), d G the two scalings' sum (softmax's backward)

The last three each replace three to six PyTorch launches of a layer's step (casts, masks, small reductions),
which a graph of ~10,000 kernels a step pays for one by one (docs/QUALITY.md).
All arithmetic is fp32; 16-bit results round once. Only for E > 1: with one expert (OneBit) the scales
are vectors, autograd's broadcasts are already cheap, and these launches measured slower (docs/RESULTS.md).
The plain-PyTorch spelling of the same formulas, and the dispatch, are in ``binarymos.kernels``.

The distillation loss's KL over the vocabulary, one program per token's row:

    _kl_rows_kernel           kl = sum_v p_t (z_t - z_s) - lse(z_t) + lse(z_s), in one pass over both rows
                              (running maxima and sums), keeping each row's two log-sum-exps
    _kl_rows_backward_kernel  d z_s = g (softmax(z_s) - softmax(z_t)), in one more pass

where autograd of log_softmax, kl_div and the float32 casts makes a dozen passes over vocabulary-sized tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import _mix, _partial_logits, _round, interpreting

BLOCK_M, BLOCK_D = 32, 128  # rows x columns per program of the forward pass
BACKWARD_BLOCK_M, BACKWARD_BLOCK_D = 128, 64  # rows per program, columns per step of the backward pass
BACKWARD_COLUMNS = 64  # columns per program of the backward pass (a multiple of BACKWARD_BLOCK_D); 0: the whole row


@triton.jit
def _load_gates(gates_ptr, rows, M, E: tl.constexpr, E_P: tl.constexpr):
    ce = tl.arange(0, E_P)
    return tl.load(gates_ptr + rows[:, None] * E + ce[None, :], mask=(rows[:, None] < M) & (ce[None, :] < E), other=0.0)


@triton.jit
def _scale_rows_kernel(a_ptr, gates_ptr, scales_ptr, bias_ptr, out_ptr, M, D, E: tl.constexpr, E_P: tl.constexpr,
                       HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    gates = _load_gates(gates_ptr, rows, M, E, E_P)
    out = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = out * _mix(gates, scales_ptr, cols, D, E, E_P, BLOCK_M, BLOCK_D)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, _round(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _scale_rows_backward_kernel(grad_ptr, saved_ptr, gates_ptr, scales_ptr, grad_a_ptr, gates_partial_ptr,
                                scales_partial_ptr, M, D, E: tl.constexpr, E_P: tl.constexpr, INTERPRET: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, COLUMNS: tl.constexpr):
    """Program (i, j) takes rows i*BLOCK_M.. and columns j*COLUMNS.., BLOCK_D at a time. It writes its rows'
    share of grad_G to gates_partial[j] (M x E) and its columns' share of grad_S to scales_partial[i] (E x D);
    the caller sums both. A 2-D grid keeps every SM busy where one program per row block ran ~2 per SM."""
    pid_m, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ce = tl.arange(0, E_P)
    gates = _load_gates(gates_ptr, rows, M, E, E_P)
    grad_gates = tl.zeros((BLOCK_M, E_P), tl.float32)
    for step in range(COLUMNS // BLOCK_D):
        cols = pid_d * COLUMNS + step * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < M) & (cols[None, :] < D)
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = grad * tl.load(saved_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = _mix(gates, scales_ptr, cols, D, E, E_P, BLOCK_M, BLOCK_D)
        tl.store(grad_a_ptr + offs, _round(grad * s, grad_a_ptr.dtype.element_ty, INTERPRET), mask=mask)
        grad_gates += _partial_logits(u, scales_ptr, cols, D, E, E_P, BLOCK_M)
        for e in tl.static_range(E):
            g = tl.sum(tl.where(ce[None, :] == e, gates, 0.0), axis=1)
            tl.store(scales_partial_ptr + (pid_m * E + e) * D + cols, tl.sum(u * g[:, None], axis=0), mask=cols < D)
    tl.store(gates_partial_ptr + (pid_d.to(tl.int64) * M + rows[:, None]) * E + ce[None, :], grad_gates,
             mask=(rows[:, None] < M) & (ce[None, :] < E))


def scale_rows_triton(a: torch.Tensor, gates: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    a = a.contiguous()
    (M, D), E = a.shape, scales.shape[0]
    out = torch.empty((M, D), device=a.device, dtype=out_dtype or a.dtype)
    if M == 0:
        return out
    _scale_rows_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(D, BLOCK_D))](
        a, gates.float().contiguous(), scales.contiguous(), bias if bias is not None else a, out, M, D, E=E,
        E_P=triton.next_power_of_2(E), HAS_BIAS=bias is not None, INTERPRET=interpreting(), BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D)
    return out


def scale_rows_backward_triton(grad: torch.Tensor, saved: torch.Tensor, gates: torch.Tensor, scales: torch.Tensor,
                               out_dtype: torch.dtype | None = None):
    grad, saved = grad.contiguous(), saved.contiguous()
    (M, D), E = grad.shape, scales.shape[0]
    columns = BACKWARD_COLUMNS or max(1, triton.cdiv(D, BACKWARD_BLOCK_D)) * BACKWARD_BLOCK_D
    if columns % BACKWARD_BLOCK_D:  # the kernel steps BLOCK_D at a time: the rest would stay unwritten
        raise ValueError(f"BACKWARD_COLUMNS {columns} is not a multiple of BACKWARD_BLOCK_D {BACKWARD_BLOCK_D}")
    grid = (triton.cdiv(M, BACKWARD_BLOCK_M), triton.cdiv(D, columns))
    grad_a = torch.empty((M, D), device=grad.device, dtype=out_dtype or grad.dtype)
    scales_partial = torch.empty((grid[0], E, D), device=grad.device, dtype=torch.float32)  # the kernel writes
    gates_partial = torch.empty((grid[1], M, E), device=grad.device, dtype=torch.float32)   # every element
    if M > 0:
        _scale_rows_backward_kernel[grid](
            grad, saved, gates.float().contiguous(), scales.contiguous(), grad_a, gates_partial, scales_partial, M, D,
            E=E, E_P=triton.next_power_of_2(E), INTERPRET=interpreting(), BLOCK_M=BACKWARD_BLOCK_M,
            BLOCK_D=BACKWARD_BLOCK_D, COLUMNS=columns)
    return grad_a, gates_partial.sum(0), scales_partial.sum(0)


@triton.jit
def _signs_kernel(w_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr + offs, tl.where(w >= 0, 1.0, -1.0).to(out_ptr.dtype.element_ty), mask=offs < N)


@triton.jit
def _ste_gradient_kernel(w_ptr, grad_ptr, out_ptr, N, clip, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < N, other=0.0)
    grad = tl.load(grad_ptr + offs, mask=offs < N, other=0.0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, tl.where(tl.abs(w) <= clip, grad, 0.0).to(out_ptr.dtype.element_ty), mask=offs < N)


@triton.jit
def _gates_backward_kernel(gates_ptr, grad_a_ptr, grad_b_ptr, out_ptr, M, E: tl.constexpr, E_P: tl.constexpr,
                           INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ce = tl.arange(0, E_P)
    mask = (rows[:, None] < M) & (ce[None, :] < E)
    offs = rows[:, None].to(tl.int64) * E + ce[None, :]
    gates = tl.load(gates_ptr + offs, mask=mask, other=0.0)
    grad = tl.load(grad_a_ptr + offs, mask=mask, other=0.0) + tl.load(grad_b_ptr + offs, mask=mask, other=0.0)
    out = gates * (grad - tl.sum(gates * grad, axis=1)[:, None])
    tl.store(out_ptr + offs, _round(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


ELEMENTS_PER_PROGRAM = 1024  # of the elementwise passes over a weight matrix


def signs_triton(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    weight = weight.contiguous()
    out = torch.empty(weight.shape, device=weight.device, dtype=dtype)
    if weight.numel():
        _signs_kernel[(triton.cdiv(weight.numel(), ELEMENTS_PER_PROGRAM),)](
            weight, out, weight.numel(), BLOCK=ELEMENTS_PER_PROGRAM)
    return out


def ste_gradient_triton(weight: torch.Tensor, grad: torch.Tensor, clip: float) -> torch.Tensor:
    weight, grad = weight.contiguous(), grad.contiguous()
    out = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
    if weight.numel():
        _ste_gradient_kernel[(triton.cdiv(weight.numel(), ELEMENTS_PER_PROGRAM),)](
            weight, grad, out, weight.numel(), float(clip), BLOCK=ELEMENTS_PER_PROGRAM)
    return out


GATES_BLOCK_M = 128


def gates_backward_triton(gates: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor,
                          out_dtype: torch.dtype) -> torch.Tensor:
    gates, grad_a, grad_b = (t.float().contiguous() for t in (gates, grad_a, grad_b))
    (M, E) = gates.shape
    out = torch.empty((M, E), device=gates.device, dtype=out_dtype)
    if M:
        _gates_backward_kernel[(triton.cdiv(M, GATES_BLOCK_M),)](
            gates, grad_a, grad_b, out, M, E=E, E_P=triton.next_power_of_2(E), INTERPRET=interpreting(),
            BLOCK_M=GATES_BLOCK_M)
    return out


@triton.jit
def _kl_rows_kernel(s_ptr, t_ptr, kl_ptr, lse_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    # per lane: running maxima, and the sums scaled by them; a finite floor instead of -inf, so that lanes past the
    # row's end rescale by exp(0) = 1 (their sums stay 0) and nothing computes -inf - -inf
    m_s, m_t = tl.full((BLOCK_V,), -1e30, tl.float32), tl.full((BLOCK_V,), -1e30, tl.float32)
    d_s, d_t, acc = tl.zeros((BLOCK_V,), tl.float32), tl.zeros((BLOCK_V,), tl.float32), tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        z_s = tl.load(s_ptr + row * V + v0 + cols, mask=mask, other=-1e30).to(tl.float32)
        z_t = tl.load(t_ptr + row * V + v0 + cols, mask=mask, other=-1e30).to(tl.float32)
        new_s, new_t = tl.maximum(m_s, z_s), tl.maximum(m_t, z_t)
        e_t = tl.where(mask, tl.exp(z_t - new_t), 0.0)
        d_s = d_s * tl.exp(m_s - new_s) + tl.where(mask, tl.exp(z_s - new_s), 0.0)
        d_t = d_t * tl.exp(m_t - new_t) + e_t
        acc = acc * tl.exp(m_t - new_t) + e_t * tl.where(mask, z_t - z_s, 0.0)
        m_s, m_t = new_s, new_t
    # the lanes combined: every lane's sums rescaled to the row's maxima
    row_s, row_t = tl.max(m_s, axis=0), tl.max(m_t, axis=0)
    scale_t = tl.exp(m_t - row_t)
    sum_s, sum_t = tl.sum(d_s * tl.exp(m_s - row_s), axis=0), tl.sum(d_t * scale_t, axis=0)
    lse_s, lse_t = row_s + tl.log(sum_s), row_t + tl.log(sum_t)
    tl.store(kl_ptr + row, tl.sum(acc * scale_t, axis=0) / sum_t - lse_t + lse_s)
    tl.store(lse_ptr + 2 * row, lse_s)
    tl.store(lse_ptr + 2 * row + 1, lse_t)


@triton.jit
def _kl_rows_backward_kernel(s_ptr, t_ptr, lse_ptr, grad_ptr, out_ptr, V, INTERPRET: tl.constexpr,
                             BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    lse_s, lse_t = tl.load(lse_ptr + 2 * row), tl.load(lse_ptr + 2 * row + 1)
    g = tl.load(grad_ptr).to(tl.float32)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + cols < V
        z_s = tl.load(s_ptr + row * V + v0 + cols, mask=mask, other=0.0).to(tl.float32)
        z_t = tl.load(t_ptr + row * V + v0 + cols, mask=mask, other=0.0).to(tl.float32)
        d = g * (tl.exp(z_s - lse_s) - tl.exp(z_t - lse_t))
        tl.store(out_ptr + row * V + v0 + cols, _round(d, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


KL_BLOCK_V = 1024  # vocabulary entries per step of a row's program


class KLSum(torch.autograd.Function):
    """sum over rows of KL(softmax(t) || softmax(s)) for logits s, t (rows, V), in float32; the gradient flows to s
    only, in s's dtype."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if s.shape != t.shape:
            raise ValueError(f"KL of logits of different shapes: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        s, t = s.contiguous(), t.contiguous()
        rows, V = s.shape
        kl = torch.empty(rows, device=s.device, dtype=torch.float32)
        lse = torch.empty(rows, 2, device=s.device, dtype=torch.float32)
        if rows:
            _kl_rows_kernel[(rows,)](s, t, kl, lse, V, BLOCK_V=KL_BLOCK_V)
        ctx.save_for_backward(s, t, lse)
        return kl.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s, t, lse = ctx.saved_tensors
        out = torch.empty_like(s)
        if len(s):
            _kl_rows_backward_kernel[(len(s),)](s, t, lse, grad.float().contiguous(), out, s.shape[1],
                                                INTERPRET=interpreting(), BLOCK_V=KL_BLOCK_V)
        return out, None


def kl_sum_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return KLSum.apply(student_logits.flatten(0, -2), teacher_logits.flatten(0, -2))
