"""Triton kernels for training BinaryMoSLinear: the per-token scaling and its gradients in one pass each.

The layer's products are cuBLAS's; what is left is elementwise work over every token's row, which
autograd spells as a dozen launches with full-size intermediates (s_in, x * s_in, s_out, dy * z, ...).
Here each row pass reads its inputs once:

    _scale_rows_kernel           out = a * (G @ S) + bias                  (x * s_in, and z * s_out + bias)
    _scale_rows_backward_kernel  grad_a = grad * (G @ S)                   (the gradient through the scaling)
                                 grad_G = (grad * saved) @ S.T            (per row, complete in one program)
                                 grad_S partials = G.T @ (grad * saved)   (per program; summed by the caller)

All arithmetic is fp32; 16-bit results round once. Only for E > 1: with one expert (OneBit) the scales
are vectors, autograd's broadcasts are already cheap, and these launches measured slower (docs/RESULTS.md).
The plain-PyTorch spelling of the same formulas, and the dispatch, are in ``binarymos.kernels``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import _mix, _partial_logits, _round, interpreting

BLOCK_M, BLOCK_D = 32, 128  # rows x columns per program of the forward pass
BACKWARD_BLOCK_M, BACKWARD_BLOCK_D = 64, 64  # rows per program (each walks the whole row), columns per step


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
def _scale_rows_backward_kernel(grad_ptr, saved_ptr, gates_ptr, scales_ptr, grad_a_ptr, grad_gates_ptr, partial_ptr,
                                M, D, E: tl.constexpr, E_P: tl.constexpr, INTERPRET: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program p walks rows p*BLOCK_M.. across all D columns, so grad_G of its rows is complete here,
    and writes its share of grad_S to partial[p] (E rows of D)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ce = tl.arange(0, E_P)
    gates = _load_gates(gates_ptr, rows, M, E, E_P)
    grad_gates = tl.zeros((BLOCK_M, E_P), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < M) & (cols[None, :] < D)
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = grad * tl.load(saved_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = _mix(gates, scales_ptr, cols, D, E, E_P, BLOCK_M, BLOCK_D)
        tl.store(grad_a_ptr + offs, _round(grad * s, grad_a_ptr.dtype.element_ty, INTERPRET), mask=mask)
        grad_gates += _partial_logits(u, scales_ptr, cols, D, E, E_P, BLOCK_M)
        for e in tl.static_range(E):
            g = tl.sum(tl.where(ce[None, :] == e, gates, 0.0), axis=1)
            tl.store(partial_ptr + (pid * E + e) * D + cols, tl.sum(u * g[:, None], axis=0), mask=cols < D)
    tl.store(grad_gates_ptr + rows[:, None] * E + ce[None, :], grad_gates, mask=(rows[:, None] < M) & (ce[None, :] < E))


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
    programs = triton.cdiv(M, BACKWARD_BLOCK_M)
    grad_a = torch.empty((M, D), device=grad.device, dtype=out_dtype or grad.dtype)
    partial = torch.zeros((programs, E, D), device=grad.device, dtype=torch.float32)
    grad_gates = torch.empty((M, E), device=grad.device, dtype=torch.float32)
    if M > 0:
        _scale_rows_backward_kernel[(programs,)](
            grad, saved, gates.float().contiguous(), scales.contiguous(), grad_a, grad_gates, partial, M, D, E=E,
            E_P=triton.next_power_of_2(E), INTERPRET=interpreting(), BLOCK_M=BACKWARD_BLOCK_M,
            BLOCK_D=BACKWARD_BLOCK_D)
    return grad_a, grad_gates, partial.sum(0)
