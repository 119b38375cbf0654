"""Host-side checks of what csrc/cuda_sm80_mainloop.cuh assumes of CuTe's layouts, which
no GPU here can test by running the kernels: the swizzled shared-memory layouts are
bijections whose chunks (8 fp16/bf16 or 4 fp32 elements: one cp.async each) stay contiguous
and 16-byte aligned, the MMA's accumulator partition covers the block tile once, the fp32
MN-major operand (TF32 dx's W, read as stored) reaches its MMA fragment slots through 32-bit
loads without bank conflicts and takes its cp.async chunks without them, and the grouped
raster visits every tile once. tests/cuda/sm80_layout_check.cu includes the kernel header
itself, compiled by nvcc for the host only (about 10 s of CPU); tests/cuda/sm90_layout_check.cu
does the same for the Hopper kernel's layouts (csrc/cuda_sm90.cu), and
tests/cuda/keep_bits_check.cu runs both dx epilogues' keep-bit packing (csrc/cuda_keep_bits.cuh)
over those kernels' accumulator partitions.
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


def _compile_and_run(check: str, tmp_path: Path) -> None:
    """Builds tests/cuda/<check>.cu for the host with nvcc and runs it: no problem reported."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) on this machine")
    cutlass = function_of_setup_py("cutlass_include_dir")()
    if cutlass is None:
        pytest.skip("no CUTLASS/CuTe headers (pip install nvidia-cutlass==4.2.0.0, or CUTLASS_PATH)")
    program = tmp_path / check
    build = subprocess.run(
        [nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-I{cutlass}", f"-I{ROOT / 'csrc'}",
         str(ROOT / "tests" / "cuda" / f"{check}.cu"), "-o", str(program)],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, f"nvcc failed:\n{build.stderr[-4000:]}"
    run = subprocess.run([str(program)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, f"layout problems:\n{run.stdout}{run.stderr}"
    assert "total problems 0" in run.stdout


def test_sm80_layout_assumptions(tmp_path):
    _compile_and_run("sm80_layout_check", tmp_path)


def test_sm90_layout_assumptions(tmp_path):
    """csrc/cuda_sm90.cu's stage layouts, transaction bytes, warpgroup rows of the accumulator
    partition and shared-memory total (tests/cuda/sm90_layout_check.cu, about 50 s of CPU)."""
    _compile_and_run("sm90_layout_check", tmp_path)


def test_keep_bits_packing_of_both_dx_epilogues(tmp_path):
    """csrc/cuda_keep_bits.cuh: the compact registers, quad transpose and stores of the sm80 and
    sm90 dx epilogues, simulated for every thread over CuTe's partition_C, give each word of a
    random 128x128 mask exactly once (tests/cuda/keep_bits_check.cu, about 50 s of CPU)."""
    _compile_and_run("keep_bits_check", tmp_path)
