"""Host check of which operands the sm90 (TMA + wgmma) kernel accepts (csrc/cuda_tma_operand.h,
review of cuda4 item A1): expanded or overlapping rows, misaligned bases or strides and
oversize extents must be rejected (they take the sm80 kernels), ordinary and padded operands
accepted. Plain C++ (tests/cuda/tma_operand_check.cpp), a second or two of compiling."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_tma_operand_predicate(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    binary = tmp_path / "tma_operand_check"
    build = subprocess.run(
        [compiler, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
         str(ROOT / "tests" / "cuda" / "tma_operand_check.cpp"), "-o", str(binary)],
        capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"compiling the check failed:\n{build.stderr[-4000:]}"
    result = subprocess.run([str(binary)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all expectations hold" in result.stdout
