"""The CUDA LUT kernel of one-token products (binarymos/kernels/lut_gemv.cu, compiled by NVRTC).

Without a GPU: every block shape the dispatcher offers, each load width, expert count, dtype and bias compile for
sm_80 and sm_90 without spilling to local memory, and the dispatcher says why it cannot run. On a GPU: against the
layer's formula in float64, outputs poisoned before each call, at every block shape, with the split-K counts left
at zero, and replayed in a CUDA graph."""
from __future__ import annotations

import re

import pytest
import torch

from binarymos.kernels import cuda_lut
from binarymos.nn import PackedBinaryMoSLinear
from pack_helpers import make_layer, reference64, rel_err

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel runs on a CUDA GPU")


def nvrtc_or_skip():
    try:
        cuda_lut._nvrtc()
    except cuda_lut.LutUnavailable:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc)")


def compiled_log(arch, rows, chunk, vec=16, experts=4, bf16=0, bias=0, pdl=1, splits=0):
    return cuda_lut.compile_lut(arch, ROWS=rows, CHUNK=chunk, VEC=vec, EXPERTS=experts, BF16=bf16, HAS_BIAS=bias,
                                PDL=pdl, ROUTER_THREADS=cuda_lut.ROUTER_THREADS, ROUTER_CHUNK=cuda_lut.ROUTER_CHUNK,
                                CLUSTER=bool(splits), SPLITS=splits)


def assert_no_spills(log: str, kernels: int = 2):
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) == kernels, log
    assert all(s == ("0", "0") for s in spills), log


@pytest.mark.parametrize("in_f", [4096, 13824])
@pytest.mark.parametrize("config", cuda_lut.LUT_CONFIGS, ids=str)
def test_every_block_shape_compiles_for_sm90_without_spills(config, in_f):
    """lut_gemv and lut_router, or lut_gemv_cluster too, at the chunk each config gives the paper's rows."""
    nvrtc_or_skip()
    splits = config.get("SPLITS", 0)
    chunk = cuda_lut.cluster_chunk(in_f, splits) if splits else config["CHUNK"]
    cubin, log = compiled_log(90, config["ROWS"], chunk, pdl=not splits, splits=splits)
    assert cubin[:4] == b"\x7fELF"
    assert_no_spills(log, 3 if splits else 2)


@pytest.mark.parametrize("arch, vec, experts, bf16, bias, pdl", [
    (90, 8, 1, 1, 1, 0),   # OneBit: no router, no PDL; bf16 with bias
    (90, 4, 8, 0, 0, 1),   # 4-byte loads, eight experts
    (80, 16, 2, 1, 0, 0),  # Ampere: no griddepcontrol
])
def test_variants_compile_without_spills(arch, vec, experts, bf16, bias, pdl):
    nvrtc_or_skip()
    assert_no_spills(compiled_log(arch, 128, 512, vec, experts, bf16, bias, pdl)[1])


def test_a_config_outside_the_kernels_limits_does_not_compile():
    nvrtc_or_skip()
    with pytest.raises(RuntimeError, match="a power of two dividing ROWS"):
        compiled_log(90, 64, 512, splits=3)


@pytest.mark.parametrize("in_f, chunk, vec", [(4096, 512, 16), (576, 512, 8), (224, 512, 4), (4096, 32, 4),
                                               (4096, 64, 8), (1000, 512, 0)])
def test_weight_vector_bytes(in_f, chunk, vec):
    """The widest load each row's chunks start aligned to and divide into; 0 (the Triton kernels) where rows are not
    whole int32 words or not contiguous."""
    packed = torch.zeros(8, (in_f + 7) // 8, dtype=torch.uint8)
    assert cuda_lut.weight_vector_bytes(packed, chunk) == vec
    assert cuda_lut.weight_vector_bytes(torch.zeros(8, 2 * packed.shape[1], dtype=torch.uint8)[:, ::2]) == 0


def test_ready_says_why_not_on_the_cpu():
    x = torch.zeros(1, 64, dtype=torch.float16)
    assert "CUDA" in cuda_lut.lut_gemv_ready(x, torch.zeros(4, 8, dtype=torch.uint8))


@pytest.mark.parametrize("K, splits, chunk", [(4096, 8, 512), (13824, 16, 896), (11008, 16, 768), (576, 8, 96),
                                              (250, 16, 32)])
def test_cluster_chunk_covers_K(K, splits, chunk):
    assert cuda_lut.cluster_chunk(K, splits) == chunk and splits * chunk >= K


def test_config_default_and_env_override(monkeypatch):
    monkeypatch.delenv("BINARYMOS_LUT_CONFIG", raising=False)
    assert cuda_lut.lut_config(4096, 4096) in cuda_lut.LUT_CONFIGS
    monkeypatch.setenv("BINARYMOS_LUT_CONFIG", "ROWS=256, CHUNK=1024")
    assert cuda_lut.lut_config(4096, 4096) == {"ROWS": 256, "CHUNK": 1024}


def run_lut(in_f, out_f, experts, bias, dtype, config=None, seed=0):
    packed = PackedBinaryMoSLinear.from_binarized(make_layer(in_f, out_f, experts, bias, seed=seed), dtype=dtype)
    packed = packed.cuda()
    args = (packed.packed_weight, packed.router if experts > 1 else None, packed.scale_in, packed.scale_out,
            packed.bias)
    x = torch.randn(1, in_f, device="cuda").to(dtype)
    out = torch.full((1, out_f), float("nan"), device="cuda", dtype=dtype)
    counts = torch.zeros(1 << 12, device="cuda", dtype=torch.int32)
    cuda_lut.lut_gemv(x, *args, out, counts, config)
    return out, reference64(x.cpu(), *(a.cpu() if a is not None else None for a in args)).cuda(), counts, args, x


@GPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_f, out_f, experts, bias", [
    (4096, 4096, 4, False),   # the paper's shape: 16-byte loads, 8 splits
    (576, 1536, 4, True),     # SmolLM2's: 72 bytes a row, 8-byte loads, a chunk past K
    (224, 100, 2, False),     # 28 bytes a row: 4-byte loads; rows past N in the last block
    (250, 40, 1, True),       # one expert, no router; the last 6 inputs padding
    (13824, 64, 8, False),    # long rows: 7 router partials
])
@pytest.mark.parametrize("config", cuda_lut.LUT_CONFIGS, ids=str)
def test_matches_float64(dtype, in_f, out_f, experts, bias, config):
    y, ref, counts, *_ = run_lut(in_f, out_f, experts, bias, dtype, config, seed=in_f)
    assert not torch.isnan(y).any()
    assert rel_err(y, ref) < TOL[dtype]
    assert int(counts.abs().sum()) == 0


@GPU
def test_dispatch_takes_the_lut_for_one_token_unless_asked_not_to(monkeypatch):
    """binary_mos_linear runs the LUT kernel for one token; BINARYMOS_LUT=0 the Triton GEMV, with the same result
    within rounding."""
    from binarymos.kernels import binary_mos_linear

    calls = []
    monkeypatch.setattr("binarymos.kernels.triton_kernels.lut_gemv",
                        lambda *a, **k: calls.append(1) or cuda_lut.lut_gemv(*a, **k))
    packed = PackedBinaryMoSLinear.from_binarized(make_layer(512, 256, 4, True), dtype=torch.float16).cuda()
    x = torch.randn(1, 1, 512, device="cuda", dtype=torch.float16)
    args = (packed.packed_weight, packed.router, packed.scale_in, packed.scale_out, packed.bias)
    lut = binary_mos_linear(x, *args)
    assert calls == [1] and lut.shape == (1, 1, 256)
    monkeypatch.setenv("BINARYMOS_LUT", "0")
    gemv = binary_mos_linear(x, *args)
    assert calls == [1]
    assert rel_err(lut, gemv.float()) < 2e-3


@GPU
@pytest.mark.parametrize("config", [{"ROWS": 128, "CHUNK": 256}, {"ROWS": 128, "SPLITS": 8}], ids=str)
def test_cuda_graph_replays_with_new_inputs(config):
    y, _, counts, args, x = run_lut(2048, 512, 4, True, torch.float16, config)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_lut.lut_gemv(x, *args, y, counts, config)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype))
        y.fill_(float("nan"))
        graph.replay()
        ref = reference64(x.cpu(), *(a.cpu() for a in args)).cuda()
        assert rel_err(y, ref) < TOL[torch.float16]
    assert int(counts.abs().sum()) == 0
