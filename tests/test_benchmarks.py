"""The GPU benchmark scripts' options, checked on the CPU before they need a GPU (each in a process of its own:
linear_latency imports Triton, which tests/test_kernels.py must import first, under its interpreter)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["linear_latency", "decode"])
def test_an_expert_count_below_one_is_refused_in_one_line(script):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--experts", "0"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == f"{script}.py: error: --experts must be >= 1"
