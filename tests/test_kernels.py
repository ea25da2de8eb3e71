"""The Triton kernels of binarymos.kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1)
at small shapes, against the float32 reference layer. The inline PTX of the sign unpacking and
of the split-K fence cannot run there; the kernels swap in plain Triton for those two steps and
the GPU benchmark (benchmarks/linear_latency.py) checks the PTX against float64.

Triton decides at import whether its own library functions are interpreted, so the switch is
set here, before anything imports Triton, and stays on for the session (CI has no GPU)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from binarymos.kernels import binary_mos_linear, binary_mos_linear_reference
from binarymos.nn import BinaryMoSLinear, PackedBinaryMoSLinear

if importlib.util.find_spec("triton") is None:
    pytest.skip("the kernel tests need Triton (pip install triton), whose CPU interpreter runs them",
                allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton was imported earlier in this session without TRITON_INTERPRET=1; run "
                "TRITON_INTERPRET=1 pytest tests/test_kernels.py", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def kernels():
    import binarymos.kernels.triton_kernels as module

    return module


def make_layer(in_f: int, out_f: int, experts: int, bias: bool, seed: int = 0) -> BinaryMoSLinear:
    """A float32 BinaryMoSLinear with a router, distinct experts and bias that actually matter."""
    torch.manual_seed(seed)
    layer = BinaryMoSLinear(in_f, out_f, num_experts=experts, bias=bias).eval()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
        layer.scale_in.uniform_(0.5, 1.5)
        layer.scale_out.uniform_(0.5, 1.5).div_(in_f ** 0.5)
        if bias:
            layer.bias.normal_(0, 0.1)
    return layer


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 37])  # decode with one token, with several; prefill
@pytest.mark.parametrize("in_f, out_f, experts, bias", [(200, 70, 4, True), (72, 40, 1, False), (136, 48, 2, False)])
def test_matches_float32_layer(kernels, dtype, m, in_f, out_f, experts, bias):
    layer = make_layer(in_f, out_f, experts, bias, seed=m)
    packed = PackedBinaryMoSLinear.from_binarized(layer, dtype=dtype)
    x = torch.randn(m, in_f)
    with torch.no_grad():
        ref = layer(x)
    y = kernels.binary_mos_linear_triton(x.to(dtype), packed.packed_weight, packed.router, packed.scale_in,
                                         packed.scale_out, packed.bias)
    assert y.dtype == dtype and y.shape == (m, out_f)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 16])
def test_split_k_matches_and_resets_counts(kernels, m):
    """Programs sharing a column block's K: the last to arrive sums, and leaves the counts at 0."""
    layer = make_layer(1000, 70, 4, bias=True)
    packed = PackedBinaryMoSLinear.from_binarized(layer, dtype=torch.float16)
    args = (packed.packed_weight, packed.router, packed.scale_in, packed.scale_out, packed.bias)
    x = torch.randn(m, 1000)
    with torch.no_grad():
        ref = layer(x)
    for split in (3, 8):
        for _ in range(2):  # a second call must find the counts reset
            cfg = {"BLOCK_N": 32, "BLOCK_G": 16, "num_warps": 4, "num_stages": 2, "SPLIT": split}
            y = kernels.binary_mos_linear_triton(x.half(), *args, config=cfg)
            assert rel_err(y, ref) < TOL[torch.float16]
        assert int(kernels._locks[x.device].abs().sum()) == 0


def test_leading_dims_and_out(kernels):
    layer = make_layer(64, 24, 4, bias=False)
    packed = PackedBinaryMoSLinear.from_binarized(layer, dtype=torch.float16)
    x = torch.randn(2, 3, 64)
    out = torch.full((2, 3, 24), float("nan"), dtype=torch.float16)
    kernels.binary_mos_linear_triton(x.half(), packed.packed_weight, packed.router, packed.scale_in,
                                     packed.scale_out, None, out=out)
    with torch.no_grad():
        assert rel_err(out, layer(x)) < TOL[torch.float16]


def test_rejects_float32_and_missing_router(kernels):
    packed = PackedBinaryMoSLinear.from_binarized(make_layer(32, 16, 4, bias=False), dtype=torch.float16)
    with pytest.raises(TypeError):
        kernels.binary_mos_linear_triton(torch.randn(1, 32), packed.packed_weight, packed.router, packed.scale_in,
                                         packed.scale_out, None)
    with pytest.raises(ValueError):
        kernels.binary_mos_linear_triton(torch.randn(1, 32).half(), packed.packed_weight, None, packed.scale_in,
                                         packed.scale_out, None)


def test_cpu_dispatch_is_the_reference():
    """Off CUDA, binary_mos_linear is the plain PyTorch formula, the packed module's own forward."""
    packed = PackedBinaryMoSLinear.from_binarized(make_layer(48, 20, 4, bias=True), dtype=torch.float32)
    x = torch.randn(5, 48)
    args = (packed.packed_weight, packed.router, packed.scale_in, packed.scale_out, packed.bias)
    assert torch.equal(binary_mos_linear(x, *args), binary_mos_linear_reference(x, *args))
    assert torch.allclose(packed(x), binary_mos_linear_reference(x, *args))
