"""Fast kernels: inference for the packed BinaryMoS layer, and the training layer's per-token scaling.

``binary_mos_linear`` computes, for x (..., in) and a layer stored as ``PackedBinaryMoSLinear``
stores it (signs packed 8 per byte along the input, least significant bit first, bit 1 = +1):

    G = softmax(x @ router.T) in float32,  s_in = G @ scale_in,  s_out = G @ scale_out
    y = ((x * s_in) @ B.T) * s_out + bias

On CUDA with Triton installed it runs the fused kernels of ``binarymos.kernels.triton_kernels`` for
fp16 and bf16 activations (imported on first use, so CPU users never need Triton); everywhere else,
float32 on CUDA too, it runs the same formula in plain PyTorch: on the CPU for up to LUT_MAX_TOKENS
tokens through a table of each byte's signed sums (``binary_mos_linear_lut``; compiled lookups with
BINARYMOS_CPU_COMPILE=1), else on the unpacked signs. With one expert the router may be None: the
scales are then scale_in[0] and scale_out[0], as in OneBit.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

__all__ = ["binary_mos_linear", "binary_mos_linear_lut", "binary_mos_linear_reference", "gates_backward", "scale_rows",
           "scale_rows_backward", "scale_rows_backward_reference", "scale_rows_reference", "signs", "ste_gradient",
           "triton_available"]


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def binary_mos_linear(x: torch.Tensor, packed_weight: torch.Tensor, router: torch.Tensor | None,
                      scale_in: torch.Tensor, scale_out: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """The packed layer's forward: Triton kernels for 16-bit activations on CUDA when Triton imports, else plain
    PyTorch."""
    if x.is_cuda and triton_available() and x.dtype in (torch.float16, torch.bfloat16):
        from .triton_kernels import binary_mos_linear_triton

        return binary_mos_linear_triton(x, packed_weight, router, scale_in, scale_out, bias)
    if x.device.type == "cpu" and x.numel() <= LUT_MAX_TOKENS * x.shape[-1]:
        return binary_mos_linear_lut(x, packed_weight, router, scale_in, scale_out, bias)
    return binary_mos_linear_reference(x, packed_weight, router, scale_in, scale_out, bias)


def binary_mos_linear_reference(x: torch.Tensor, packed_weight: torch.Tensor, router: torch.Tensor | None,
                                scale_in: torch.Tensor, scale_out: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The formula of SPEC.md on the unpacked signs, in x's dtype (the kernels' ground truth). The signs are unpacked
    UNPACK_CHUNK at a time (whole output rows), so no call holds the layer's whole weight in x's dtype."""
    from ..nn import token_scales, unpack_signs

    s_in, s_out = token_scales(x, router, scale_in, scale_out)
    xs, steps = x * s_in, _row_steps(len(packed_weight), x.shape[-1], UNPACK_CHUNK)
    y = xs.new_empty(*xs.shape[:-1], len(packed_weight))
    for start in steps:
        rows = packed_weight[start:start + steps.step]
        y[..., start:start + steps.step] = F.linear(xs, unpack_signs(rows, x.shape[-1], x.dtype))
    y = y * s_out
    return y if bias is None else y + bias.to(y.dtype)


def _row_steps(out_features: int, row_size: int, budget: int) -> range:
    """Where the CPU products' steps start: whole output rows, about ``budget`` elements a step."""
    return range(0, out_features, max(1, budget // row_size))


# Signs unpacked per step of the unpacked product: 4 MB in float32. Unpacking a 4096 -> 11008 layer whole allocated
# 180 MB a call, and took 1.5-5.3x the time of these steps on 2 cores (docs/RESULTS.md, session 12).
UNPACK_CHUNK = 1 << 20


# Up to this many tokens the CPU reads the product through byte tables: on 2 cores (docs/RESULTS.md) as fast as
# unpacking + matmul or up to 5.7x faster at 1-2 tokens on SmolLM2's and LLaMA-7B's shapes; at 4 tokens slower
# on SmolLM2's (0.75-0.95x), at 8 slower on all.
LUT_MAX_TOKENS = 2
# The byte-table product gathers this many table entries (output rows x bytes per row) per step: intermediates of
# 1-2 MB stay in cache and are reused instead of fresh allocations of the whole layer's size (22 MB at 4096 -> 11008,
# whose page faults made the product 3-5x slower than this on 2 cores; docs/RESULTS.md).
LUT_CHUNK = 1 << 18
# On the CPU, BINARYMOS_CPU_COMPILE=1 (or `binarymos generate --compile`) runs the byte tables' lookups through
# torch.compile instead: inductor's C++ sums each row's lookups in one loop, with nothing gathered in between; on 2
# cores 1.2-2.1x faster than dense float32 on LLaMA-sized layers (docs/RESULTS.md). It needs a C++ compiler and
# compiles once per process (~5 s); where compiling fails the lookups go on as below, with a warning.
CPU_COMPILE = os.environ.get("BINARYMOS_CPU_COMPILE", "").lower() in ("1", "true", "yes")
_compiled_once = False  # after a first compiled call errors are the caller's, not the compiler's: they propagate


def _table_sums(table: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    """y[t, o] = sum_g table[t, 256 g + packed[o, g]] for table (tokens, 256 * groups) and packed (out, groups)."""
    rows, groups = packed_weight.shape
    offsets = 256 * torch.arange(groups, dtype=torch.int32, device=packed_weight.device)
    index = (packed_weight.to(torch.int32) + offsets).flatten()
    return table.index_select(1, index).view(len(table), rows, groups).sum(-1)


@functools.cache
def _compiled_table_sums():
    return torch.compile(_table_sums, dynamic=True)


def _cpu_table_sums(table: torch.Tensor, packed_weight: torch.Tensor, out: torch.Tensor) -> None:
    global CPU_COMPILE, _compiled_once
    if CPU_COMPILE and table.device.type == "cpu":
        try:
            out.copy_(_compiled_table_sums()(table, packed_weight))
            _compiled_once = True
            return
        except Exception as err:  # no C++ compiler, or inductor cannot build here: the plain lookups give the same
            if _compiled_once:
                raise
            CPU_COMPILE = False
            warnings.warn(f"binarymos: BINARYMOS_CPU_COMPILE: torch.compile failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); using the plain lookups")
    steps = _row_steps(len(packed_weight), packed_weight.shape[1], LUT_CHUNK)
    for start in steps:
        out[:, start:start + steps.step] = _table_sums(table, packed_weight[start:start + steps.step])


def binary_mos_linear_lut(x: torch.Tensor, packed_weight: torch.Tensor, router: torch.Tensor | None,
                          scale_in: torch.Tensor, scale_out: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's numbers for a few tokens without unpacking the weight: for every token, byte position g
    and byte value v, table[g, v] = sum_j xs[8g + j] * (+1 if bit j of v else -1), in float32 (or x's dtype if
    wider); then y[o] = sum_g table[g, packed[o, g]], one lookup per 8 signs. xs = x * s_in is rounded to x's
    dtype first and y after, as the reference and the kernels round them. The lookups go LUT_CHUNK at a time, or
    compiled (CPU_COMPILE)."""
    from ..nn import byte_signs, token_scales

    s_in, s_out = token_scales(x, router, scale_in, scale_out)
    out_features, groups = packed_weight.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    xs = F.pad((x * s_in).reshape(-1, x.shape[-1]).to(acc), (0, 8 * groups - x.shape[-1]))
    table = xs.view(-1, groups, 8) @ byte_signs(acc, x.device).T  # (tokens, groups, 256)
    y = torch.empty(len(xs), out_features, dtype=acc, device=x.device)
    _cpu_table_sums(table.flatten(1), packed_weight, y)
    y = y.to(x.dtype).view(*x.shape[:-1], out_features) * s_out
    return y if bias is None else y + bias.to(y.dtype)


def scale_rows(a: torch.Tensor, gates: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a * (gates @ scales) + bias for rows a (M, D), gates (M, E), scales (E, D).

    The training layer's x * s_in and z * s_out + bias in one pass (``binarymos.kernels.training`` on
    CUDA), computed in float32 (or a's dtype if wider) and returned in ``out_dtype`` (default a's).
    """
    if a.is_cuda and triton_available():
        from .training import scale_rows_triton

        return scale_rows_triton(a, gates, scales, bias, out_dtype)
    return scale_rows_reference(a, gates, scales, bias, out_dtype)


def scale_rows_backward(grad: torch.Tensor, saved: torch.Tensor, gates: torch.Tensor, scales: torch.Tensor,
                        out_dtype: torch.dtype | None = None):
    """Gradients of out = a * (gates @ scales) given d out = ``grad`` and ``saved`` = a, each (M, D):

    grad * (gates @ scales) in ``out_dtype`` (default grad's), (grad * saved) @ scales.T (M, E) and
    gates.T @ (grad * saved) (E, D), the last two in float32 or wider.
    """
    if grad.is_cuda and triton_available():
        from .training import scale_rows_backward_triton

        return scale_rows_backward_triton(grad, saved, gates, scales, out_dtype)
    return scale_rows_backward_reference(grad, saved, gates, scales, out_dtype)


def signs(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """+1 where weight >= 0, else -1 (NaN too), in ``dtype``: the training layer's binarized weight, one pass on
    CUDA."""
    if weight.is_cuda and triton_available():
        from .training import signs_triton

        return signs_triton(weight, dtype)
    from ..nn import binary_sign

    return binary_sign(weight).to(dtype)


def ste_gradient(weight: torch.Tensor, grad: torch.Tensor, clip: float) -> torch.Tensor:
    """The latent weight's gradient through the sign: ``grad`` (the signs' gradient, any dtype) where abs(weight) <=
    clip, compared in the weight's dtype, and 0 elsewhere; in the weight's dtype."""
    if weight.is_cuda and triton_available():
        from .training import ste_gradient_triton

        return ste_gradient_triton(weight, grad, clip)
    return torch.where(weight.abs() <= clip, grad.to(weight.dtype), 0.0)


def gates_backward(gates: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """The router logits' gradient for gates = softmax(logits) (M, E) and the gates' gradient grad_a + grad_b (the
    two scalings' shares): gates * (d - sum_e gates * d), computed in float32 or wider, returned in ``out_dtype``."""
    if gates.is_cuda and triton_available():
        from .training import gates_backward_triton

        return gates_backward_triton(gates, grad_a, grad_b, out_dtype)
    d = grad_a + grad_b
    return (gates * (d - (gates * d).sum(-1, keepdim=True))).to(out_dtype)


def scale_rows_reference(a, gates, scales, bias=None, out_dtype=None) -> torch.Tensor:
    """``scale_rows`` in plain PyTorch (CPU, and where Triton is missing)."""
    acc = torch.promote_types(a.dtype, torch.float32)
    out = a.to(acc) * (gates.to(acc) @ scales.to(acc))
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(out_dtype or a.dtype)


def scale_rows_backward_reference(grad, saved, gates, scales, out_dtype=None):
    """``scale_rows_backward`` in plain PyTorch."""
    acc = torch.promote_types(grad.dtype, torch.float32)
    gates, scales = gates.to(acc), scales.to(acc)
    grad_a = (grad.to(acc) * (gates @ scales)).to(out_dtype or grad.dtype)
    u = grad.to(acc) * saved.to(acc)
    return grad_a, u @ scales.T, gates.T @ u
