"""Host-side checks of what csrc/cuda_sm80_mainloop.cuh assumes of CuTe's layouts, which
no GPU here can test by running the kernels: the swizzled shared-memory layouts are
bijections whose 8-element chunks (one cp.async each) stay contiguous and 16-byte
aligned, the MMA's accumulator partition covers the block tile once, and the grouped
raster visits every tile once. tests/cuda/sm80_layout_check.cu includes the kernel header
itself, compiled by nvcc for the host only (about 10 s of CPU).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from setup_py import function_of_setup_py

ROOT = Path(__file__).resolve().parent.parent


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else shutil.which("nvcc")


def test_sm80_layout_assumptions(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) on this machine")
    cutlass = function_of_setup_py("cutlass_include_dir")()
    if cutlass is None:
        pytest.skip("no CUTLASS/CuTe headers (pip install nvidia-cutlass==4.2.0.0, or CUTLASS_PATH)")
    program = tmp_path / "sm80_layout_check"
    build = subprocess.run(
        [nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-I{cutlass}", f"-I{ROOT / 'csrc'}",
         str(ROOT / "tests" / "cuda" / "sm80_layout_check.cu"), "-o", str(program)],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, f"nvcc failed:\n{build.stderr[-4000:]}"
    run = subprocess.run([str(program)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, f"layout problems:\n{run.stdout}{run.stderr}"
    assert "total problems 0" in run.stdout
