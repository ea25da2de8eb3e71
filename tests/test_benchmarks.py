"""The GPU benchmark scripts' options, checked on the CPU before they need a GPU (each in a process of its own:
linear_latency imports Triton, which tests/test_kernels.py must import first, under its interpreter)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, option, bad, error", [
    ("linear_latency", "--experts", "0", "--experts must be >= 1"),
    ("decode", "--experts", "0", "--experts must be >= 1"),
    ("decode", "--profile", "-1", "--profile must be >= 0"),
])
def test_a_bad_option_is_refused_in_one_line(script, option, bad, error):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), option, bad],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == f"{script}.py: error: {error}"


def test_decode_profile_splits_a_token_into_kernel_kinds_and_idle_time(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import decode

    kernels = [("_gemv_kernel", 3000.0, 6), ("_router_kernel", 600.0, 6), ("nvjet_hsh_64x8_64x16_gemv", 900.0, 3),
               ("void gemv2T_kernel_val<int, int, __half>", 300.0, 3),
               ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits>", 1200.0, 3),
               ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<c10::Half>>", 450.0, 9)]
    per_token = decode.kernel_ms_by_kind(kernels, steps=3)  # microseconds over 3 tokens -> ms a token
    assert per_token == pytest.approx({"binarymos": 1.2, "cublas": 0.4, "attention": 0.4, "other": 0.15,
                                       "kernels": 10})
    rows = [{"model": "m", "batch": 1, "variant": "binarymos", "ms_per_step": 2.5, "kernel_ms": per_token},
            {"model": "m", "batch": 1, "variant": "fp16", "ms_per_step": 4.0, "kernel_ms": None}]
    table = decode.profile_table(rows)
    assert table[3] == ("| model shape | batch | variant | wall | binarymos | cublas | attention | other | idle "
                        "| kernels a token |")
    assert table[-1] == "| m | 1 | binarymos | 2.500 | 1.200 | 0.400 | 0.400 | 0.150 | 0.350 | 10 |"  # idle 2.5 - 2.15
    assert decode.profile_table(rows[1:]) == []
