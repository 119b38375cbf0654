"""The benchmark scripts run on CPU with their tiniest settings and write what they promise.

Each script runs once per module in a subprocess (as a user runs it, without the Triton
interpreter that tests/conftest.py switches on); the tests then read its files. Speed is
never asserted; the saved-for-backward bytes are, since they are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lora_fused

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
STAMP_KEYS = ("date_utc", "device_type", "device_name", "cuda", "torch", "triton", "git_revision")
SEED_BYTES = 8  # the dropout seed, a 0-dim int64 tensor saved beside x and xa

try:
    import peft  # noqa: F401

    HAS_PEFT = True
except ImportError:
    HAS_PEFT = False
try:
    import segment_anything  # noqa: F401

    HAS_SAM = True
except ImportError:
    HAS_SAM = False


def _run(script: str, out: Path, *args: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(BENCHMARKS / script), "--device", "cpu", "--threads", "1", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return {"stderr": proc.stderr}


def _cpu_lora_backends() -> list[str]:
    return [b for b in lora_fused.available_backends("cpu") if b != "triton"]


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_layer")
    _run("bench_layer.py", out, "--quick", "--shapes", "qkv", "--layouts", "global",
         "--warmup-ms", "2", "--rep-ms", "5")
    return out, json.loads((out / "layer.json").read_text())


@pytest.fixture(scope="module")
def sam_run(tmp_path_factory):
    if not HAS_SAM:
        pytest.skip("segment_anything is not installed")
    out = tmp_path_factory.mktemp("bench_sam")
    _run("bench_sam.py", out, "--quick", "--dropout", "0.1", "--steps", "1", "--warmup-steps", "1")
    return out, json.loads((out / "sam.json").read_text())


def test_layer_files_and_stamp(layer_run):
    out, payload = layer_run
    assert (out / "layer.md").exists()
    assert sorted(p.name for p in out.glob("layer_*.png")) == ["layer_fp32_r16_p0.0.png", "layer_fp32_r16_p0.1.png"]
    stamp = payload["stamp"]
    for key in STAMP_KEYS:
        assert key in stamp, key
    assert stamp["device_type"] == "cpu" and stamp["device_name"].startswith("CPU")
    assert payload["settings"]["quick"] is True and not payload["truncated"]
    markdown = (out / "layer.md").read_text()
    assert "CPU" in markdown.splitlines()[0] and "**CPU run**" in markdown


def test_layer_rows(layer_run):
    _, payload = layer_run
    rows = payload["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    providers = {r["provider"] for r in rows}
    expected = {"linear", "addmm", *_cpu_lora_backends()} | ({"peft"} if HAS_PEFT else set())
    assert providers == expected
    assert "triton" in payload["settings"]["skipped"]
    # ViT-B's qkv at 128 px: 8×8 tokens in the global layout
    shapes = {(r["layout"], r["tokens"], r["in_features"], r["out_features"]) for r in rows}
    assert shapes == {("global", 64, 768, 2304)}
    lora_rows = [r for r in rows if r["provider"] != "linear"]
    assert len(lora_rows) == 2 * 3 * (len(expected) - 1)  # dropouts × modes × providers
    assert len(rows) - len(lora_rows) == 2 * 3  # the nn.Linear floor, measured with each group
    for row in rows:
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["tflops"] > 0 and row["ratio_to_linear"] > 0
    if HAS_PEFT:
        assert all(r["speedup_vs_peft"] > 0 for r in lora_rows)


def test_layer_saved_bytes(layer_run):
    _, payload = layer_run
    rows = [r for r in payload["rows"] if r["mode"] == "full"]
    for row in rows:
        bound = row["x_bytes"] + row["xa_bytes"]
        if row["provider"] == "linear":
            assert row["saved_activation_bytes"] == 0  # frozen W: backward needs only W, a parameter
        elif row["provider"] in ("torch", "cuda"):
            assert row["saved_activation_bytes"] <= bound + SEED_BYTES, row
        elif row["provider"] == "peft" and row["dropout"] > 0:
            assert row["saved_activation_bytes"] > bound, row  # PEFT keeps the dropped copy of x and the mask


def test_sam_files_and_rows(sam_run):
    out, payload = sam_run
    assert (out / "sam.md").exists() and (out / "sam.png").exists()
    for key in STAMP_KEYS:
        assert key in payload["stamp"], key
    assert payload["stamp"]["device_type"] == "cpu"
    assert payload["settings"]["model"] == "tiny"
    rows = payload["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    variants = {r["variant"] for r in rows}
    expected = {"full"} | {f"lora-{b}" for b in _cpu_lora_backends()} | ({"peft"} if HAS_PEFT else set())
    assert variants == expected
    lora = [r for r in rows if r["variant"] not in ("full",)]
    assert {r["dropout"] for r in lora} == {0.1}
    trainable = {r["trainable_params"] for r in lora}
    assert len(trainable) == 1, "PEFT and lora_fused must train the same adapters"
    full = next(r for r in rows if r["variant"] == "full")
    assert full["trainable_params"] == full["total_params"] > trainable.pop()
    for row in rows:
        assert row["images_per_s"] > 0 and row["saved_activation_bytes"] > 0
        assert row["peak_mem_bytes"] is None  # n/a on CPU
    assert "**CPU run**" in (out / "sam.md").read_text()


def test_pytest_benchmark_cases_run_once_as_smoke():
    """``pytest benchmarks`` (pyproject adds --benchmark-disable) runs each case once."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", str(BENCHMARKS), "-q", "-p", "no:cacheprovider", "-k", "qkv and p0.1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
