"""benchmarks/gpu_check.sh in its dry-run mode: the same stages on the CPU with tiny settings,
so a broken script is caught here rather than in a GPU machine's short slot."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "deps", "smoke", "layer", "sam", "suite")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the real check runs instead")


def _run_check(tmp_path: Path, budget: int) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "WORKDIR": str(work), "PYTHON": sys.executable, "BUDGET": str(budget)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=budget + 120)
    return proc, out, work


def _bundled(out: Path) -> set[str]:
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        return {name.removeprefix("./") for name in tar.getnames()}


def test_dry_run_runs_every_stage_and_brings_back_few_files(tmp_path):
    proc, out, work = _run_check(tmp_path, budget=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    returned = sorted(p.name for p in out.iterdir())
    assert len(returned) <= 8 and all(p.is_file() for p in out.iterdir()), returned  # a GPU machine returns ≤ 8 files
    assert {"summary.md", "gpu_check.tar.gz"} <= set(returned)
    steps = (work / "steps.txt").read_text()
    for stage in STAGES:
        assert f"{stage} rc=0" in steps, steps
    bundled = _bundled(out)
    for name in ("smoke.xml", "suite.xml", "layer/layer.json", "layer/layer.md", "sam/sam.json", "env.log"):
        assert name in bundled, sorted(bundled)
    summary = (out / "summary.md").read_text()
    assert "dry run" in summary and "smoke:" in summary and "passed" in summary and "FAILED" not in summary


def test_a_short_budget_still_brings_back_what_finished(tmp_path):
    proc, out, work = _run_check(tmp_path, budget=40)
    steps = (work / "steps.txt").read_text()
    assert "skipped: out of time" in steps, steps  # the later stages are not started past the budget
    assert "env" in steps and "env.log" in _bundled(out)  # the finished stage came back
    assert (out / "summary.md").is_file()
