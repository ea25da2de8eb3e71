"""Fast inference for the packed BinaryMoS layer.

``binary_mos_linear`` computes, for x (..., in) and a layer stored as ``PackedBinaryMoSLinear``
stores it (signs packed 8 per byte along the input, least significant bit first, bit 1 = +1):

    G = softmax(x @ router.T) in float32,  s_in = G @ scale_in,  s_out = G @ scale_out
    y = ((x * s_in) @ B.T) * s_out + bias

On CUDA with Triton installed it runs the fused kernels of ``binarymos.kernels.triton_kernels``
(imported on first use, so CPU users never need Triton); everywhere else it runs the same formula
in plain PyTorch. With one expert the router may be None: the scales are then scale_in[0] and
scale_out[0], as in OneBit.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

__all__ = ["binary_mos_linear", "binary_mos_linear_reference", "triton_available"]


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def binary_mos_linear(x: torch.Tensor, packed_weight: torch.Tensor, router: torch.Tensor | None,
                      scale_in: torch.Tensor, scale_out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The packed layer's forward: Triton kernels on CUDA when Triton imports, else plain PyTorch."""
    if x.is_cuda and triton_available():
        from .triton_kernels import binary_mos_linear_triton

        return binary_mos_linear_triton(x, packed_weight, router, scale_in, scale_out, bias)
    return binary_mos_linear_reference(x, packed_weight, router, scale_in, scale_out, bias)


def binary_mos_linear_reference(x: torch.Tensor, packed_weight: torch.Tensor, router: torch.Tensor | None,
                                scale_in: torch.Tensor, scale_out: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The formula of SPEC.md on the unpacked signs, in x's dtype (the kernels' ground truth)."""
    from ..nn import unpack_signs

    if scale_in.shape[0] == 1:
        s_in, s_out = scale_in[0].to(x.dtype), scale_out[0].to(x.dtype)
    else:
        g = torch.softmax(F.linear(x, router.to(x.dtype)).float(), dim=-1)
        s_in, s_out = (g @ scale_in.float()).to(x.dtype), (g @ scale_out.float()).to(x.dtype)
    y = F.linear(x * s_in, unpack_signs(packed_weight, x.shape[-1], x.dtype)) * s_out
    return y if bias is None else y + bias.to(y.dtype)
