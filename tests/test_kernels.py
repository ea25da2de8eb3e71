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

import numpy as np
import pytest
import torch

from binarymos.kernels import binary_mos_linear, binary_mos_linear_reference
from binarymos.nn import PackedBinaryMoSLinear
from pack_helpers import make_layer, reference64, rel_err

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 37])  # decode with one token, with several; prefill
@pytest.mark.parametrize("in_f, out_f, experts, bias", [(200, 70, 4, True), (72, 40, 1, False), (136, 48, 2, False),
                                                      (200, 70, 8, False), (136, 48, 3, True)])  # E=8: QUALITY.md's best
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


# ---- prefill (M > 16): unpack + cuBLAS ----

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [17, 40])
@pytest.mark.parametrize("in_f, out_f, experts, bias", [(1000, 777, 4, True), (76, 45, 1, False)])
@pytest.mark.parametrize("prep_block_m, chunks", [(1, 3), (4, 1)])
def test_prefill_cublas_matches_float64(kernels, monkeypatch, dtype, m, in_f, out_f, experts, bias, prep_block_m,
                                        chunks):
    """Signs unpacked to a scratch tensor, cuBLAS's product (CPU matmul here), s_out and bias applied in place;
    with a signs cap that splits the output rows into ``chunks`` chunks."""
    monkeypatch.setattr(kernels, "UNPACK_MAX_ELEMENTS", out_f * in_f // chunks)
    assert -(-out_f // kernels._unpacked_rows(out_f, in_f)) == chunks
    packed = PackedBinaryMoSLinear.from_binarized(make_layer(in_f, out_f, experts, bias, seed=m), dtype=dtype)
    args = (packed.packed_weight, packed.router if experts > 1 else None, packed.scale_in, packed.scale_out,
            packed.bias)
    x = torch.randn(m, in_f).to(dtype)
    out = torch.full((m, out_f), float("nan"), dtype=dtype)
    kernels.binary_mos_linear_triton(x, *args, config={"PREP_BLOCK_M": prep_block_m}, out=out)
    assert not torch.isnan(out).any()
    assert rel_err(out, reference64(x, *args)) < TOL[dtype]


# ---- one token (M == 1): the sign-flip GEMV (_gemv_kernel) ----

@pytest.fixture
def gemv_calls(kernels, monkeypatch):
    """Records the configs of the calls that took the one-token GEMV path."""
    calls = []
    original = kernels.gemv_launches

    def spy(*args, **kwargs):
        calls.append(dict(args[7]))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "gemv_launches", spy)
    return calls


def run_m1(kernels, in_f, out_f, experts, bias, dtype, config=None, seed=0):
    packed = PackedBinaryMoSLinear.from_binarized(make_layer(in_f, out_f, experts, bias, seed=seed), dtype=dtype)
    args = (packed.packed_weight, packed.router, packed.scale_in, packed.scale_out, packed.bias)
    x = torch.randn(1, in_f).to(dtype)
    out = torch.full((1, out_f), float("nan"), dtype=dtype)
    kernels.binary_mos_linear_triton(x, *args, config=config, out=out)
    return out, reference64(x, *args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_f, out_f, experts, bias", [
    (256, 72, 4, True),   # whole words, router, bias
    (256, 40, 1, False),  # one expert: no router
    (224, 48, 4, False),  # 7 words a row: row starts 4-byte aligned only
    (250, 40, 2, True),   # 32 bytes a row, the last 6 inputs padding
    (256, 72, 8, True),   # eight experts (the quality study's best, docs/QUALITY.md)
    (256, 40, 3, False),  # an expert count that is no power of two
])
def test_m1_gemv_matches_float64(kernels, gemv_calls, dtype, in_f, out_f, experts, bias):
    y, ref = run_m1(kernels, in_f, out_f, experts, bias, dtype)
    assert len(gemv_calls) == 1, "M == 1 with whole int32 words per row must take the GEMV path"
    assert y.dtype == dtype and not torch.isnan(y).any()
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("router_inline", [1, 0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_f, out_f, experts, bias, router_block_k", [
    (256, 72, 4, True, None),    # 32 bytes a row, K a fraction of the default router step
    (512, 40, 2, False, 128),    # 64 bytes a row, 4 whole router steps
    (224, 48, 4, False, 64),     # 28 bytes a row: the last router step half full
    (250, 40, 2, True, 64),      # 32 bytes a row, the last 6 inputs padding: the last step partial
    (2304, 36, 4, True, None),   # 288 bytes a row: two default steps, the second 256 of 2048 inputs
    (2304, 36, 2, False, None),
])
def test_m1_gemv_router_inline_and_launch_match_float64(kernels, gemv_calls, dtype, in_f, out_f, experts, bias,
                                                        router_block_k, router_inline):
    """The one-token GEMV computing the logits itself (ROUTER_INLINE=1, one launch) and after the router
    launch (ROUTER_INLINE=0): both match float64, with fp32 logits over all K in router steps of any fill."""
    cfg = {"BLOCK_N": 32, "BLOCK_W": 8, "num_warps": 4, "ROUTER_INLINE": router_inline}
    if router_block_k:
        cfg["ROUTER_BLOCK_K"] = router_block_k
    y, ref = run_m1(kernels, in_f, out_f, experts, bias, dtype, config=cfg, seed=in_f + experts)
    assert gemv_calls == [cfg]
    assert y.dtype == dtype and not torch.isnan(y).any()
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("experts", [4, 2, 1])
@pytest.mark.parametrize("router_inline", [0, 1])
def test_m1_gemv_inline_router_is_one_launch(kernels, experts, router_inline):
    """ROUTER_INLINE=1: the GEMV alone, no router launch and no logits buffer; =0: the router's partials
    first (E > 1). One expert has no router either way."""
    in_f, out_f = 256, 64
    layer = PackedBinaryMoSLinear.from_binarized(make_layer(in_f, out_f, experts, bias=False), dtype=torch.float16)
    y = torch.empty(1, out_f, dtype=torch.float16)
    cfg = {"BLOCK_N": 32, "BLOCK_W": 8, "num_warps": 4, "ROUTER_INLINE": router_inline, "PDL": 1}
    launches = kernels.gemv_launches(torch.zeros(1, in_f, dtype=torch.float16), layer.packed_weight,
                                     layer.router if experts > 1 else None, layer.scale_in, layer.scale_out, None,
                                     y, cfg, True)
    two = experts > 1 and not router_inline
    assert [k for k, *_ in launches] == ([kernels._router_kernel] if two else []) + [kernels._gemv_kernel]
    kernel, grid, args, kwargs = launches[-1]
    assert kwargs["ROUTER_INLINE"] == (experts > 1 and bool(router_inline))
    assert (args[3] is y) == (not two)  # logits_ptr: an unread placeholder without a router launch
    assert not kwargs["PDL"] and "launch_pdl" not in kwargs  # the interpreter; on sm_90 only behind the router


def test_m1_gemv_config_default_and_env_override(kernels, gemv_calls, monkeypatch):
    """gemv_config computes the router inline up to GEMV_INLINE_ROUTER_MAX_K inputs, launches it beyond;
    BINARYMOS_GEMV_CONFIG (k=v ints) replaces it."""
    monkeypatch.delenv("BINARYMOS_GEMV_CONFIG", raising=False)
    assert kernels.gemv_config(4096, 4096, torch.float16)["ROUTER_INLINE"] == 1
    assert kernels.gemv_config(4096, kernels.GEMV_INLINE_ROUTER_MAX_K + 32, torch.float16)["ROUTER_INLINE"] == 0
    for env, inline in (("BLOCK_N=32,BLOCK_W=8,num_warps=4,ROUTER_INLINE=1,ROUTER_BLOCK_K=64", 1),
                        ("BLOCK_N=32,BLOCK_W=8,num_warps=4,ROUTER_INLINE=0,PDL=1", 0)):
        monkeypatch.setenv("BINARYMOS_GEMV_CONFIG", env)
        y, ref = run_m1(kernels, 256, 40, 4, True, torch.float16)
        assert gemv_calls[-1]["ROUTER_INLINE"] == inline
        assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_m1_unaligned_rows_fall_back(kernels, gemv_calls, dtype):
    """ceil(in / 8) % 4 != 0: the rows are not whole int32 words; the tensor-core decode path runs."""
    y, ref = run_m1(kernels, 200, 56, 4, True, dtype, config={"BLOCK_N": 32, "BLOCK_W": 32, "num_warps": 4})
    assert gemv_calls == []
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("router_inline", [0, 1])
@pytest.mark.parametrize("split, block_w", [(2, 8), (3, 8), (5, 4)])  # 2 steps a share; shares past K; 2 steps
def test_m1_gemv_split_k_and_steps(kernels, gemv_calls, split, block_w, router_inline):
    """K shared by SPLIT programs of several steps each; the arrival counts are back at 0 after each call."""
    cfg = {"BLOCK_N": 32, "BLOCK_W": block_w, "num_warps": 4, "SPLIT": split, "ROUTER_INLINE": router_inline,
           "ROUTER_BLOCK_K": 256}
    for _ in range(2):
        y, ref = run_m1(kernels, 1024, 70, 4, True, torch.float16, config=cfg)
        assert rel_err(y, ref) < TOL[torch.float16]
        assert int(kernels._locks[torch.device("cpu")].abs().sum()) == 0
    assert len(gemv_calls) == 2


@pytest.mark.parametrize("router_inline", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_m1_gemv_precision_long_rows(kernels, gemv_calls, dtype, router_inline):
    """16-term 16-bit partial sums stay within the float64 tolerance at the paper's longest rows (and the
    inline router's 7 steps, the last 1536 of 2048 inputs)."""
    cfg = dict(kernels.gemv_config(32, 13824, dtype), ROUTER_INLINE=router_inline)
    y, ref = run_m1(kernels, 13824, 32, 4, False, dtype, config=cfg)
    assert len(gemv_calls) == 1
    assert rel_err(y, ref) < TOL[dtype]


def test_m1_leading_dims_use_gemv(kernels, gemv_calls):
    packed = PackedBinaryMoSLinear.from_binarized(make_layer(128, 24, 4, bias=False), dtype=torch.float16)
    args = (packed.packed_weight, packed.router, packed.scale_in, packed.scale_out, None)
    x = torch.randn(1, 1, 128).half()
    y = kernels.binary_mos_linear_triton(x, *args)
    assert y.shape == (1, 1, 24) and len(gemv_calls) == 1
    assert rel_err(y[0], reference64(x[0], *args)) < TOL[torch.float16]


def _emulate_flip_ptx(asm: str, w: np.ndarray, pairs: list, kind: str) -> np.ndarray:
    """Runs the PTX of _flip_sum_asm on numpy arrays (the instructions it uses, nothing more): every
    register a uint32 (or uint16) bit pattern, 16-bit pair arithmetic rounded to nearest even through
    torch, fp32 adds in numpy float32 (IEEE, round to nearest even)."""
    dt = torch.float16 if kind == "f16" else torch.bfloat16
    u32 = lambda v: np.asarray(v, dtype=np.uint64).astype(np.uint32)  # noqa: E731

    def halves(v):  # uint32 pairs -> two float32 tensors (low, high half)
        return torch.from_numpy(np.stack([v & 0xFFFF, v >> 16]).astype(np.uint16).view(np.int16)).view(dt).float()

    def pack(h):  # two float32 tensors -> uint32 pairs, each half rounded to dt
        b = h.to(dt).view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
        return b[0] | (b[1] << 16)

    def f32(v):
        return np.asarray(v, dtype=np.uint32).view(np.float32)

    def lop3(a, b, c, lut):
        out = np.zeros_like(a)
        for idx in range(8):
            if lut >> idx & 1:
                out |= ((a if idx & 4 else ~a) & (b if idx & 2 else ~b) & (c if idx & 1 else ~c))
        return out

    reg = {f"${i + 2}": u32(p) for i, p in enumerate(pairs)}
    reg["$1"] = u32(w)
    val = lambda s: reg[s] if s in reg else np.full(w.shape, int(s, 0), dtype=np.uint32)  # noqa: E731
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        ops = [o.strip() for o in rest.replace("{", "").replace("}", "").split(",")]
        if op == "shl.b32":
            reg[ops[0]] = u32(val(ops[1]).astype(np.uint64) << int(ops[2]))
        elif op == "and.b32":
            reg[ops[0]] = val(ops[1]) & val(ops[2])
        elif op == "lop3.b32":
            reg[ops[0]] = lop3(val(ops[1]), val(ops[2]), val(ops[3]), int(ops[4], 0))
        elif op in ("add.rn.f16x2", "add.rn.bf16x2"):
            reg[ops[0]] = pack(halves(val(ops[1])) + halves(val(ops[2])))
        elif op == "fma.rn.bf16x2":  # exact product, one rounding (float32 holds a bf16 product exactly)
            reg[ops[0]] = pack(halves(val(ops[1])) * halves(val(ops[2])) + halves(val(ops[3])))
        elif op == "mov.b32" and len(ops) == 3:  # {lo, hi} <- t
            reg[ops[0]], reg[ops[1]] = val(ops[2]) & 0xFFFF, val(ops[2]) >> 16
        elif op == "mov.b32":
            reg[ops[0]] = val(ops[1])
        elif op == "cvt.f32.f16":
            h = torch.from_numpy(reg[ops[1]].astype(np.uint16).view(np.int16)).view(torch.float16).float()
            reg[ops[0]] = h.numpy().view(np.uint32)
        elif op == "add.f32":
            reg[ops[0]] = (f32(val(ops[1])) + f32(val(ops[2]))).view(np.uint32)
        else:
            raise AssertionError(f"unknown instruction {line}")
    return f32(reg["$0"]).astype(np.float64)


@pytest.mark.parametrize("kind, terms", [("f16", 16), ("bf16", 16), ("f16", 8), ("bf16", 4)])
def test_flip_sum_ptx_semantics(kernels, kind, terms):
    """The GPU's inline PTX, emulated: pair i = (x[32c + i], x[32c + 16 + i]); each input with its sign
    flipped where its weight bit is 0; the sum matches the exact one within the 16-bit tree's rounding."""
    dt = torch.float16 if kind == "f16" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    n = 512
    x = torch.randn(n, 32, generator=g).to(dt)
    w = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64).numpy().astype(np.uint32)
    bits = (torch.from_numpy(w.astype(np.int64))[:, None] >> torch.arange(32)) & 1
    exact = ((2 * bits - 1).double() * x.double()).sum(1).numpy()
    u = x.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    pairs = [u[:, i] | (u[:, i + 16] << 16) for i in range(16)]
    got = _emulate_flip_ptx(kernels.FLIP_SUM_ASM[(kind == "bf16", terms)], w, pairs, kind)
    # the same tree written out: within each half, adjacent leaves first, every level rounded to 16 bits
    t = ((2 * bits - 1).to(dt) * x).reshape(n, 2, 16)
    while t.shape[-1] > 16 // terms:
        t = (t[..., 0::2].float() + t[..., 1::2].float()).to(dt)
    tree = torch.zeros(n)
    for part in t.reshape(n, -1).float().unbind(1):  # the PTX adds the partials in this order, in fp32
        tree = tree + part
    np.testing.assert_array_equal(got, tree.double().numpy())
    eps = 2.0 ** (-11 if kind == "f16" else -8)
    assert np.all(np.abs(got - exact) <= 4 * eps * x.double().abs().sum(1).numpy())  # <= 4 roundings per leaf


# --- the training layer's row scaling (binarymos.kernels.training) ---

def _random_scaling(m: int, d: int, experts: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gates = torch.softmax(torch.randn(m, experts, generator=g) * 2, -1)
    return gates, torch.rand(experts, d, generator=g) + 0.5, torch.randn(d, generator=g)


@pytest.mark.parametrize("dtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
@pytest.mark.parametrize("m, d, experts, bias", [(1, 40, 4, True), (37, 200, 4, False), (70, 130, 2, True),
                                                 (33, 64, 8, True)])
def test_scale_rows_matches_float64(m, d, experts, bias, dtype, out_dtype):
    from binarymos.kernels.training import scale_rows_triton

    gates, scales, b = _random_scaling(m, d, experts)
    a = torch.randn(m, d).to(dtype)
    out = scale_rows_triton(a, gates, scales, b if bias else None, out_dtype=out_dtype)
    ref = a.double() * (gates.double() @ scales.double()) + (b.double() if bias else 0)
    assert out.dtype == out_dtype and out.shape == (m, d)
    tol = 2 ** -8 if out_dtype == torch.bfloat16 else 1e-6  # one rounding of the fp32 result
    assert ((out.double() - ref).abs() <= tol * ref.abs() + 1e-6).all()


@pytest.mark.parametrize("m, d, experts", [(1, 40, 4), (70, 200, 4), (65, 130, 2), (33, 64, 8), (300, 72, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("columns", [64, 128, 0])
def test_scale_rows_backward_matches_float64(monkeypatch, m, d, experts, dtype, columns):
    """grad * s, (grad * saved) @ S.T per row, and G.T @ (grad * saved), each summed over the programs
    that share it, for one tile, two tiles and the whole row per program (300 rows: three row blocks of
    the default 128, the last one partial)."""
    from binarymos.kernels import training
    from binarymos.kernels.training import scale_rows_backward_triton

    monkeypatch.setattr(training, "BACKWARD_COLUMNS", columns)
    empty = torch.empty  # the outputs start as NaN: an element the kernel leaves unwritten fails the test
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(float("nan")))

    gates, scales, _ = _random_scaling(m, d, experts, seed=1)
    grad, saved = torch.randn(m, d).to(dtype), torch.randn(m, d).to(dtype)
    grad_a, grad_gates, grad_scales = scale_rows_backward_triton(grad, saved, gates, scales)
    gd, u = grad.double(), grad.double() * saved.double()
    s = gates.double() @ scales.double()
    tol = 2 ** -8 if dtype == torch.bfloat16 else 1e-6
    assert grad_a.dtype == dtype and ((grad_a.double() - gd * s).abs() <= tol * (gd * s).abs() + 1e-6).all()
    torch.testing.assert_close(grad_scales.double(), gates.double().T @ u, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_gates.double(), u @ scales.double().T, rtol=1e-5, atol=1e-4)


def _both(name: str):
    """The plain-PyTorch function of binarymos.kernels and its Triton twin (what a GPU runs)."""
    import binarymos.kernels as dispatch
    from binarymos.kernels import training

    return [getattr(dispatch, name), getattr(training, f"{name}_triton")]


@pytest.mark.parametrize("shape", [(70, 130), (1, 1), (33, 1025), (0, 8)])  # 1025: two programs, the second partial
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_signs_are_plus_one_from_zero_up_and_minus_one_below(shape, dtype):
    weight = torch.randn(shape)
    weight.view(-1)[: min(3, weight.numel())] = torch.tensor([0.0, -0.0, float("nan")])[: min(3, weight.numel())]
    want = [1.0 if w >= 0 else -1.0 for w in weight.view(-1).tolist()]  # NaN >= 0 is False: -1
    for signs in _both("signs"):
        out = signs(weight, dtype)
        assert out.dtype == dtype and out.shape == weight.shape
        assert out.view(-1).tolist() == want


@pytest.mark.parametrize("clip", [1.0, 0.3])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_ste_gradient_passes_where_the_weight_is_within_the_clip(clip, grad_dtype):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(33, 1025, generator=g)
    weight.view(-1)[:2] = torch.tensor([clip, -clip])  # on the edge: passed
    grad = torch.randn(33, 1025, generator=g).to(grad_dtype)
    edge = float(torch.tensor(clip))  # compared in the weight's float32, as PyTorch compares a tensor with a number
    want = [gr if abs(w) <= edge else 0.0 for w, gr in zip(weight.view(-1).tolist(), grad.float().view(-1).tolist())]
    for ste_gradient in _both("ste_gradient"):
        out = ste_gradient(weight, grad, clip)
        assert out.dtype == weight.dtype and out.view(-1).tolist() == want


@pytest.mark.parametrize("m, experts", [(300, 4), (1, 2), (37, 8), (5, 3)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gates_backward_is_the_softmax_gradient_in_float64(m, experts, out_dtype):
    """d logits for gates = softmax(logits) and d gates = a + b, against autograd of softmax in float64."""
    g = torch.Generator().manual_seed(m)
    logits = torch.randn(m, experts, generator=g, dtype=torch.float64, requires_grad=True)
    a, b = torch.randn(m, experts, generator=g), torch.randn(m, experts, generator=g)
    torch.softmax(logits, -1).backward(a.double() + b.double())
    gates = torch.softmax(logits.detach(), -1).float()
    tol = 2 ** -8 if out_dtype == torch.bfloat16 else 1e-6
    for gates_backward in _both("gates_backward"):
        out = gates_backward(gates, a, b, out_dtype)
        assert out.dtype == out_dtype and out.shape == (m, experts)
        assert ((out.double() - logits.grad).abs() <= tol * logits.grad.abs() + 1e-6).all()


@pytest.mark.parametrize("experts", [4, 2])
def test_training_layer_on_the_triton_kernels_matches_float64(monkeypatch, experts):
    """BinaryMoSLinear's forward and backward with the Triton row kernels (as on a GPU) against
    autograd of the formula in float64 with the sign's gradient passed straight through."""
    import binarymos.kernels as dispatch
    from binarymos.kernels.training import scale_rows_backward_triton, scale_rows_triton

    monkeypatch.setattr(dispatch, "scale_rows", scale_rows_triton)
    monkeypatch.setattr(dispatch, "scale_rows_backward", scale_rows_backward_triton)
    for name in ("signs", "ste_gradient", "gates_backward"):
        monkeypatch.setattr(dispatch, name, _both(name)[1])
    layer = make_layer(72, 40, experts, bias=True).train()
    x = torch.randn(3, 25, 72, requires_grad=True)
    upstream = torch.randn(3, 25, 40)
    y = layer(x)
    (y * upstream).sum().backward()

    p = {n: t.detach().double().requires_grad_(True) for n, t in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    w = p["weight"]
    signs = torch.where(w.detach() >= 0, 1.0, -1.0).double() + (w - w.detach()) * (w.detach().abs() <= 1)
    gates = torch.softmax(x64 @ p["router.weight"].T, -1)
    ref = ((x64 * (gates @ p["scale_in"])) @ signs.T) * (gates @ p["scale_out"]) + p["bias"]
    (ref * upstream.double()).sum().backward()
    assert rel_err(y, ref.detach()) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5
    for name, t in layer.named_parameters():
        assert rel_err(t.grad, p[name].grad) < 1e-5, name


# --- the distillation loss's KL over the vocabulary (binarymos.kernels.training.KLSum) ---

@pytest.mark.parametrize("rows, vocab, spread", [(5, 3000, 4.0), (3, 1024, 30.0), (1, 7, 1.0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kl_sum_and_its_gradient_match_float64(rows, vocab, spread, dtype):
    """KL(softmax(t) || softmax(s)) summed over rows, and d/ds = g (softmax(s) - softmax(t)), written out in float64;
    vocabularies that are not a multiple of the kernel's step, and logits spread wide enough to overflow exp."""
    from binarymos.kernels.training import kl_sum_triton

    g = torch.Generator().manual_seed(rows)
    s = (spread * torch.randn(2, rows, vocab, generator=g)).to(dtype).requires_grad_(True)
    t = (spread * torch.randn(2, rows, vocab, generator=g)).to(dtype)
    kl = kl_sum_triton(s, t)
    (3.0 * kl).backward()
    s64, t64 = s.detach().double(), t.double()
    log_ps, log_pt = s64 - s64.logsumexp(-1, keepdim=True), t64 - t64.logsumexp(-1, keepdim=True)
    expected = (log_pt.exp() * (log_pt - log_ps)).sum()
    assert kl.dtype == torch.float32 and s.grad.dtype == dtype
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-5)
    # float32 rounds z - lse(z) to ~1e-7 of the logits' size, which exp turns into a relative error that large
    tol = 2 ** -8 if dtype == torch.bfloat16 else 4e-7 * s64.abs().max().item()
    grad = 3.0 * (log_ps.exp() - log_pt.exp())
    assert ((s.grad.double() - grad).abs() <= tol * grad.abs() + 1e-7).all()


def test_scale_rows_backward_refuses_columns_its_steps_would_leave_unwritten(monkeypatch):
    from binarymos.kernels import training

    gates, scales, _ = _random_scaling(4, 100, 2)
    monkeypatch.setattr(training, "BACKWARD_COLUMNS", training.BACKWARD_BLOCK_D + 32)
    with pytest.raises(ValueError, match="not a multiple of BACKWARD_BLOCK_D"):
        training.scale_rows_backward_triton(torch.randn(4, 100), torch.randn(4, 100), gates, scales)
