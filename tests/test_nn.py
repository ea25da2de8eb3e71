"""BinaryMoSLinear, OneBit (E=1) and the static sign baseline against the formulas written out in float64."""
import os
import shutil

import pytest
import torch
from torch import nn

from binarymos import BinaryMoSLinear, SignLinear
from binarymos.nn import PackedBinaryMoSLinear, token_scales
from pack_helpers import rel_err


def formula(x, weight, router, scale_in, scale_out, bias=None):
    """SPEC.md's layer in float64: sign with sign(0)=+1, softmax gates, mixed scales."""
    x, weight, router, scale_in, scale_out = (t.double() for t in (x, weight, router, scale_in, scale_out))
    signs = torch.where(weight >= 0, 1.0, -1.0).double()
    gates = torch.softmax(x @ router.T, dim=-1)
    y = ((x * (gates @ scale_in)) @ signs.T) * (gates @ scale_out)
    return y if bias is None else y + bias.double()


def random_layer(in_f=24, out_f=20, experts=4, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = BinaryMoSLinear.from_linear(nn.Linear(in_f, out_f, bias=bias), num_experts=experts)
    with torch.no_grad():  # distinct experts and a strong router, so the mixture matters
        layer.scale_in.copy_(torch.rand(experts, in_f) + 0.5)
        layer.scale_out.copy_(torch.rand(experts, out_f) + 0.5)
        layer.router.weight.copy_(torch.randn(experts, in_f))
    return layer


def test_forward_matches_formula_with_leading_batch_dims():
    layer = random_layer()
    x = torch.randn(2, 3, 5, 24)
    y = layer(x)
    ref = formula(x, layer.weight, layer.router.weight, layer.scale_in, layer.scale_out, layer.bias)
    assert y.shape == (2, 3, 5, 20)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_gates_are_a_float32_softmax_even_for_half_inputs():
    layer = random_layer().to(torch.bfloat16)
    gates = layer.gates(torch.randn(7, 24, dtype=torch.bfloat16))
    assert gates.dtype == torch.float32
    torch.testing.assert_close(gates.sum(-1), torch.ones(7))


def test_token_scales_mix_the_experts_by_the_gates_and_one_expert_needs_no_router():
    torch.manual_seed(0)
    x, router, scale_in, scale_out = torch.randn(3, 5, 8), torch.randn(4, 8), torch.rand(4, 8), torch.rand(4, 6)
    gates = torch.softmax(x.double() @ router.double().T, dim=-1)
    s_in, s_out = token_scales(x, router, scale_in, scale_out)
    assert (s_in.shape, s_out.shape, s_in.dtype) == ((3, 5, 8), (3, 5, 6), torch.float32)
    torch.testing.assert_close(s_in.double(), gates @ scale_in.double())
    torch.testing.assert_close(s_out.double(), gates @ scale_out.double())
    s_in, s_out = token_scales(x.half(), None, scale_in[:1], scale_out[:1])
    assert s_in.dtype == torch.float16 and torch.equal(s_in, scale_in[0].half()) and torch.equal(s_out, scale_out[0].half())


def test_sign_of_zero_is_plus_one():
    layer = random_layer(bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(4, 24)
    ref = formula(x, torch.ones(20, 24), layer.router.weight, layer.scale_in, layer.scale_out)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_straight_through_gradient_is_clipped_at_one():
    layer = random_layer(bias=False)
    with torch.no_grad():
        layer.weight.mul_(3)  # many latent weights beyond |w| = 1
        layer.weight[0, :4] = torch.tensor([1.0, -1.0, 1.0001, -0.0])
    x = torch.randn(6, 24, dtype=torch.float64)
    upstream = torch.randn(6, 20, dtype=torch.float64)
    (layer.double()(x) * upstream).sum().backward()
    # reference: d/dB of the float64 formula with B a free variable, passed where |w| <= 1
    signs = torch.where(layer.weight >= 0, 1.0, -1.0).double().requires_grad_(True)
    gates = torch.softmax(x @ layer.router.weight.detach().T, -1)
    y = ((x * (gates @ layer.scale_in.detach())) @ signs.T) * (gates @ layer.scale_out.detach())
    (y * upstream).sum().backward()
    mask = (layer.weight.detach().abs() <= 1).double()
    torch.testing.assert_close(layer.weight.grad, signs.grad * mask, rtol=1e-5, atol=1e-6)  # gates are float32
    assert layer.weight.grad[0, 0] != 0 and layer.weight.grad[0, 1] != 0 and layer.weight.grad[0, 2] == 0
    assert layer.scale_in.grad is not None and layer.router.weight.grad is not None


@pytest.mark.parametrize("experts, bias", [(4, True), (1, False)])
def test_every_gradient_matches_autograd_of_the_formula(experts, bias):
    """The hand-written backward against autograd of SPEC.md's formula in float64, the sign's gradient
    passed straight through where |w| <= 1; x, latent weights, router, both scales and bias."""
    layer = random_layer(experts=experts, bias=bias).double()
    with torch.no_grad():
        layer.weight.mul_(2)  # some latent weights beyond the clip
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 20, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    x_ref = x.detach().clone().requires_grad_(True)
    w = params["weight"]
    mask = (w.detach().abs() <= 1).double()
    signs = torch.where(w.detach() >= 0, 1.0, -1.0).double() + (w - w.detach()) * mask  # value sign, gradient mask
    if experts > 1:
        gates = torch.softmax(x_ref @ params["router.weight"].T, dim=-1)
        s_in, s_out = gates @ params["scale_in"], gates @ params["scale_out"]
    else:
        s_in, s_out = params["scale_in"][0], params["scale_out"][0]
    y = ((x_ref * s_in) @ signs.T) * s_out + (params["bias"] if bias else 0)
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)  # gates are float32
    for name, p in layer.named_parameters():
        if name == "router.weight" and experts == 1:
            assert p.grad is None  # no router with one expert
            continue
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the training layer's Triton kernels run on a GPU")
@pytest.mark.parametrize("autocast", [False, True])
def test_training_layer_on_the_gpu_matches_the_formula_in_float64(autocast):
    """The fused layer on a GPU (its Triton passes compiled, not interpreted), at a SmolLM2 MLP's shape with latent
    weights beyond the clip: the output and every gradient against autograd of the formula in float64, in float32
    (no TF32) and under bf16 autocast as in training (16-bit products: ~2^-9 a rounding)."""
    layer = random_layer(in_f=576, out_f=1536, experts=4).cuda()
    with torch.no_grad():
        layer.weight.mul_(3 / layer.weight.abs().max())  # two thirds of the latent weights beyond the clip
        layer.router.weight.mul_(0.05)  # logits of about unit size: mixed gates, not one expert per token
    x = torch.randn(4, 300, 576, device="cuda", requires_grad=True)
    upstream = torch.randn(4, 300, 1536, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() * upstream).sum().backward()
    params = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    w = params["weight"]
    signs = torch.where(w.detach() >= 0, 1.0, -1.0).double() + (w - w.detach()) * (w.detach().abs() <= 1)
    gates = torch.softmax(x64 @ params["router.weight"].T, dim=-1)
    ref = ((x64 * (gates @ params["scale_in"])) @ signs.T) * (gates @ params["scale_out"]) + params["bias"]
    (ref * upstream.double()).sum().backward()
    tol = 2e-2 if autocast else 1e-4
    assert rel_err(y, ref.detach()) < tol and rel_err(x.grad, x64.grad) < tol
    for name, p in layer.named_parameters():
        assert rel_err(p.grad, params[name].grad) < tol, name


def test_autocast_computes_in_bfloat16_and_returns_float32():
    layer = random_layer()
    x = torch.randn(3, 7, 24)
    ref = formula(x, layer.weight, layer.router.weight, layer.scale_in, layer.scale_out, layer.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 2e-2  # bfloat16 products (not float32 ones), and no worse than its resolution


def test_svd_init_is_rank_one_of_abs_weight():
    torch.manual_seed(1)
    linear = nn.Linear(48, 40)
    layer = BinaryMoSLinear.from_linear(linear, num_experts=3)
    u, s, vh = torch.linalg.svd(linear.weight.detach().abs().double())
    rank1 = s[0] * torch.outer(u[:, 0], vh[0])
    for e in range(3):
        torch.testing.assert_close(torch.outer(layer.scale_out[e], layer.scale_in[e]).double(), rank1,
                                   rtol=1e-4, atol=1e-6)
        assert (layer.scale_out[e] > 0).all() and (layer.scale_in[e] > 0).all()
        # sqrt(sigma) on each side
        torch.testing.assert_close(layer.scale_out[e].norm().double(), s[0].sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.weight, linear.weight)
    torch.testing.assert_close(layer.bias, linear.bias)


def test_one_expert_is_onebit():
    torch.manual_seed(2)
    linear = nn.Linear(32, 16, bias=False)
    layer = BinaryMoSLinear.from_linear(linear, num_experts=1)
    x = torch.randn(5, 32)
    w = linear.weight.detach().double()
    u, s, vh = torch.linalg.svd(w.abs())
    a, b = u[:, 0].abs() * s[0].sqrt(), vh[0].abs() * s[0].sqrt()  # OneBit: W ~ sign(W) * (a b^T)
    onebit = ((x.double() * b) @ torch.where(w >= 0, 1.0, -1.0).double().T) * a
    torch.testing.assert_close(layer(x).double(), onebit, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("experts", [0, -1])
def test_fewer_than_one_expert_is_refused(experts):
    with pytest.raises(ValueError, match="num_experts"):
        BinaryMoSLinear(8, 8, num_experts=experts)


def test_sign_baseline_is_sign_times_row_mean_abs():
    torch.manual_seed(3)
    linear = nn.Linear(16, 12)
    layer = SignLinear.from_linear(linear)
    x = torch.randn(3, 16)
    w = linear.weight.detach().double()
    ref = (x.double() @ torch.where(w >= 0, 1.0, -1.0).double().T) * w.abs().mean(1) + linear.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("in_f, out_f, experts, bias", [(200, 70, 4, True), (72, 40, 1, False), (61, 24, 2, True),
                                                      (64, 32, 8, False)])
def test_the_cpu_products_match_the_formula_in_float64(dtype, tol, in_f, out_f, experts, bias):
    """Both CPU paths: the byte-table product (few tokens, the weight never unpacked) and unpacking + matmul."""
    from pack_helpers import make_layer, reference64, rel_err

    from binarymos.kernels import LUT_MAX_TOKENS, binary_mos_linear_lut, binary_mos_linear_reference

    packed = PackedBinaryMoSLinear.from_binarized(make_layer(in_f, out_f, experts, bias), dtype=dtype)
    args = (packed.packed_weight, packed.router, packed.scale_in, packed.scale_out, packed.bias)
    for shape in [(1, in_f), (2, 2, in_f), (LUT_MAX_TOKENS + 1, in_f)]:  # the layer takes each path once
        x = torch.randn(shape).to(dtype)
        ref = reference64(x, *args)
        for y in (binary_mos_linear_lut(x, *args), binary_mos_linear_reference(x, *args), packed(x)):
            assert y.dtype == dtype and y.shape == (*shape[:-1], out_f) and rel_err(y, ref) < tol
    assert packed(torch.randn(0, in_f).to(dtype)).shape == (0, out_f)


@pytest.mark.parametrize("chunk", [1, 600, 1 << 20])  # one row a step (chunk < a row), 3 rows with a rest, all
def test_the_cpu_products_in_chunks_of_rows_match_the_formula_in_float64(monkeypatch, chunk):
    from pack_helpers import make_layer, reference64, rel_err

    from binarymos import kernels

    # 200 inputs, 25 bytes a row: 600 signs or 75 table entries are 3 rows a step, and 70 rows = 23 * 3 + 1
    monkeypatch.setattr(kernels, "CPU_COMPILE", False)  # the plain lookups, LUT_CHUNK at a time
    monkeypatch.setattr(kernels, "UNPACK_CHUNK", chunk)
    monkeypatch.setattr(kernels, "LUT_CHUNK", chunk // 8)
    packed = PackedBinaryMoSLinear.from_binarized(make_layer(200, 70, 4, True), dtype=torch.float32)
    args = (packed.packed_weight, packed.router, packed.scale_in, packed.scale_out, packed.bias)
    x = torch.randn(2, 200)
    for product in (kernels.binary_mos_linear_lut, kernels.binary_mos_linear_reference):
        assert rel_err(product(x, *args), reference64(x, *args)) < 1e-6


def _packed_args(in_f, out_f):
    from pack_helpers import make_layer

    packed = PackedBinaryMoSLinear.from_binarized(make_layer(in_f, out_f, 4, True), dtype=torch.float32)
    return packed.packed_weight, packed.router, packed.scale_in, packed.scale_out, packed.bias


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile on the CPU needs C++")
def test_the_compiled_byte_table_lookups_match_the_formula_in_float64(monkeypatch):
    from pack_helpers import reference64, rel_err

    from binarymos import kernels

    compiled, calls = kernels._compiled_table_sums(), []
    monkeypatch.setattr(kernels, "CPU_COMPILE", True)
    monkeypatch.setattr(kernels, "_compiled_table_sums", lambda: lambda *a: calls.append(1) or compiled(*a))
    for in_f, out_f, tokens in [(200, 70, 1), (72, 40, 2), (61, 24, 1)]:  # layer shapes dynamic: no graph of their own
        args, x = _packed_args(in_f, out_f), torch.randn(tokens, in_f)
        assert rel_err(kernels.binary_mos_linear_lut(x, *args), reference64(x, *args)) < 1e-6
    assert kernels.CPU_COMPILE and len(calls) == 3  # every call compiled: no fallback


def test_binarymos_cpu_compile_in_the_environment_turns_the_compiled_lookups_on():
    import subprocess
    import sys

    def seen(value):
        env = {**os.environ, "BINARYMOS_CPU_COMPILE": value}
        code = "import binarymos.kernels as k; print(k.CPU_COMPILE)"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()

    assert [seen(v) for v in ("1", "True", "yes", "0", "")] == ["True", "True", "True", "False", "False"]


def test_where_compiling_fails_the_plain_lookups_take_over_with_a_warning(monkeypatch):
    from pack_helpers import reference64, rel_err

    from binarymos import kernels

    def no_compiler():
        raise RuntimeError("InductorError: no C++ compiler\nmore lines")

    monkeypatch.setattr(kernels, "CPU_COMPILE", True)
    monkeypatch.setattr(kernels, "_compiled_table_sums", no_compiler)
    args, x = _packed_args(72, 40), torch.randn(1, 72)
    monkeypatch.setattr(kernels, "_compiled_once", False)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError: InductorError: no C\+\+ compiler\)"):
        y = kernels.binary_mos_linear_lut(x, *args)
    assert not kernels.CPU_COMPILE and rel_err(y, reference64(x, *args)) < 1e-6
    monkeypatch.setattr(kernels, "CPU_COMPILE", True)
    monkeypatch.setattr(kernels, "_compiled_once", True)  # it had compiled before: an error now is not the compiler's
    with pytest.raises(RuntimeError, match="no C"):
        kernels.binary_mos_linear_lut(x, *args)


def test_the_byte_table_first_made_in_inference_mode_still_serves_autograd():
    from binarymos.kernels import binary_mos_linear_lut
    from binarymos.nn import byte_signs

    byte_signs.cache_clear()
    args = _packed_args(72, 40)
    with torch.inference_mode():
        binary_mos_linear_lut(torch.randn(1, 72), *args)
    x = torch.randn(1, 72, requires_grad=True)
    binary_mos_linear_lut(x, *args).sum().backward()  # "Inference tensors cannot be saved for backward" before
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unpacked_signs_are_the_packed_bits():
    from binarymos.nn import pack_signs, unpack_signs

    weight = torch.randn(5, 21)
    for dtype in (torch.float32, torch.bfloat16):
        signs = unpack_signs(pack_signs(weight), 21, dtype)
        assert signs.dtype == dtype and torch.equal(signs.float(), torch.where(weight >= 0, 1.0, -1.0))


def test_the_cpu_reads_up_to_lut_max_tokens_through_byte_tables(monkeypatch):
    from pack_helpers import make_layer

    from binarymos import kernels

    calls = []
    monkeypatch.setattr(kernels, "binary_mos_linear_lut", lambda x, *args: calls.append(x.shape) or x[..., :3])
    packed = PackedBinaryMoSLinear.from_binarized(make_layer(16, 3, 2, bias=False), dtype=torch.float32)
    for tokens in (1, kernels.LUT_MAX_TOKENS, kernels.LUT_MAX_TOKENS + 1):
        packed(torch.randn(tokens, 16))
    assert calls == [(1, 16), (kernels.LUT_MAX_TOKENS, 16)]
